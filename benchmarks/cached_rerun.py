"""Wall time of `crucible run CONFIG` when every stage is already complete.

    python benchmarks/cached_rerun.py [configs/demo.yaml]

Runs the pipeline once (stages run or are cached), then again and prints the second run's
wall time: start-up, the temporary Prefect server, planning and one cached MLflow run per
stage, and no stage work.
"""

from __future__ import annotations

import subprocess
import sys
import time


def timed_run(config: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", config], check=True, capture_output=True)
    return time.monotonic() - started


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml"
    first = timed_run(config)
    second = timed_run(config)
    print(f"config: {config}")
    print(f"first run (stages run or cached): {first:.1f} s")
    print(f"second run (every stage cached):  {second:.1f} s")


if __name__ == "__main__":
    main()
