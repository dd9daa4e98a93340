"""Prefect flows and the ``crucible`` CLI.

Importing this package sets the embedded defaults before Prefect is imported: analytics off,
and Prefect's local state (the temporary server's SQLite DB) under Crucible's state dir, so
``prefect server start`` with the same ``PREFECT_HOME`` shows the runs in the UI.
"""

import os

from tasks.paths import state_dir

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
# The temporary server's first start creates its database; give slow machines time for that.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
