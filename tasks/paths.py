"""The state dir: where embedded services keep their state (MLflow DB, Prefect DB, default store).

``$CRUCIBLE_HOME`` if set, else ``.crucible`` in the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("CRUCIBLE_HOME", ".crucible")).expanduser().resolve()
