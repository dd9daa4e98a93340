"""The state dir: where embedded services keep their state (MLflow DB, Prefect DB, default store).

``$CRUCIBLE_HOME`` if set, else ``.crucible`` in the working directory.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("CRUCIBLE_HOME", ".crucible")).expanduser().resolve()


def state_db(file: str, table: str, timeout_s: float = 30) -> sqlite3.Connection:
    """A connection to an SQLite file in the state dir, its one table created if missing
    (``table`` is that table's ``name (columns)``); the caller closes it."""
    path = state_dir() / file
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=timeout_s)
    db.execute(f"CREATE TABLE IF NOT EXISTS {table}")
    return db
