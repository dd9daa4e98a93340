"""The ``crucible`` command as users type it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flows.cli import main, status_report
from tasks.config import load_config
from tasks.engine import run_pipeline


def crucible(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_stages_lists_the_fixed_order(capsys):
    assert main(["stages"]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert lines[:3] == ["ingest", "filter", "dedup"] and lines[-1] == "evaluate"


def test_bad_config_fails_before_anything_runs(tmp_home, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: t\ningest:\n  sources:\n    - {name: a, path: x.jsonl, domain: web, colour: 1}\n")
    result = crucible("run", str(cfg))
    assert result.returncode == 2
    assert f"{cfg}: invalid config" in result.stderr
    assert "ingest.sources[0].colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_home / "store").exists()


def test_missing_inputs_and_unknown_stage_fail_clearly(tmp_home, tmp_path):
    cfg = tmp_path / "missing.yaml"
    cfg.write_text(f"name: t\ningest:\n  sources:\n    - {{name: a, path: '{tmp_path}/none/*.jsonl', domain: web}}\n")
    result = crucible("run", str(cfg))
    assert result.returncode == 2 and "ingest.sources[0].path: no files match" in result.stderr
    result = crucible("run", "configs/tiny.yaml", "--until", "nope")
    assert result.returncode == 2 and "unknown stage" in result.stderr


def test_status_json_reports_every_configured_stage(tmp_home, ray_session, capsys):
    tiny = load_config("configs/tiny.yaml")
    report = status_report("configs/tiny.yaml")
    assert [s["stage"] for s in report["stages"]] == tiny.configured_stages()
    assert {s["status"] for s in report["stages"]} == {"missing"} and report["stages"][0]["rows"] is None

    run_pipeline(tiny, until_stage="ingest")
    assert main(["status", "configs/tiny.yaml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"config", "name", "store", "stages"}
    ingest, *rest = report["stages"]
    assert ingest["status"] == "done" and ingest["rows"] == 52
    assert all(s["status"] == "missing" for s in rest)
    assert set(ingest) == {"stage", "status", "fingerprint", "path", "rows", "tokens", "finished_at", "mlflow_run_id"}
    assert ingest["path"].startswith(str(tmp_home / "store" / "ingest"))


def test_demo_data_leaves_unchanged_files_alone(tmp_path):
    assert crucible("demo-data", str(tmp_path)).returncode == 0
    files = sorted(tmp_path.glob("*.jsonl"))
    assert {f.stem for f in files} >= {"web", "legal", "code", "docs"}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = crucible("demo-data", str(tmp_path))
    assert again.returncode == 0 and "written" not in again.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
