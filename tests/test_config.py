"""Config errors name the file, the field path and the reason, before anything runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import tasks.registry as registry

from tasks.config import load_config, validate_config
from tasks.engine import plan
from tasks.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(exc: ConfigError) -> dict[str, str]:
    return dict(exc.problems)


def test_shipped_configs_validate():
    assert load_config("configs/tiny.yaml").configured_stages()[0] == "ingest"
    assert load_config("configs/demo.yaml").name == "demo"


def test_a_base_config_lends_its_sections_whole(tmp_path):
    demo, grpo = load_config("configs/demo.yaml"), load_config("configs/demo_grpo.yaml")
    assert grpo.name == "demo-grpo" and grpo.align.method == "grpo" and grpo.align.reward == "arithmetic"
    assert grpo.align.dpo == demo.align.dpo.__class__()  # the base's dpo settings did not leak in
    assert grpo.pretrain == demo.pretrain and grpo.evaluate == demo.evaluate
    assert load_config("configs/demo_ppo.yaml").align.method == "ppo"

    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml(.|\n)*no such file"):
        load_config(tmp_path / "c.yaml")


def test_unknown_key_names_file_and_field(tmp_path):
    path = write(tmp_path, """
        name: t
        ingest:
          sources:
            - {name: a, path: x.jsonl, domain: web, colour: blue}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert problems(err.value) == {"ingest.sources[0].colour": "unknown key"}


def test_wrong_type_names_field(tmp_path):
    path = write(tmp_path, """
        name: t
        ray: {num_cpus: many}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "ray.num_cpus" in problems(err.value)
    assert "integer" in problems(err.value)["ray.num_cpus"]


def test_missing_required_and_bad_name(tmp_path):
    path = write(tmp_path, """
        name: "has spaces"
        ingest:
          sources:
            - {name: a, path: x.jsonl}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    found = problems(err.value)
    assert "name" in found
    assert found["ingest.sources[0].domain"] == "Field required"


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: t\ningest: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "line" in str(err.value) and "not valid YAML" in str(err.value)


def test_missing_source_file_is_a_config_error(tmp_path):
    path = write(tmp_path, f"""
        name: t
        ingest:
          sources:
            - {{name: a, path: "{tmp_path}/nothing/*.jsonl", domain: web}}
    """)
    config = load_config(path)
    with pytest.raises(ConfigError) as err:
        plan(config)
    assert "no files match" in problems(err.value)["ingest.sources[0].path"]


def test_duplicate_source_names(tmp_path):
    path = write(tmp_path, """
        name: t
        ingest:
          sources:
            - {name: a, path: x.jsonl, domain: web}
            - {name: a, path: y.jsonl, domain: web}
    """)
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(path)


def test_html_option_and_formats_are_explained(tmp_path):
    path = write(tmp_path, """
        name: t
        ingest:
          sources:
            - {name: a, path: x.html, format: text, html: true, domain: web}
            - {name: b, path: y.htm, format: htm, domain: web}
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    found = problems(err.value)
    assert found["ingest.sources[0]"] == "html: true is for jsonl and parquet text fields; for HTML files use format: html, not text"
    assert found["ingest.sources[1].format"] == "Input should be 'jsonl', 'parquet', 'text', 'html' or 'warc'"


def test_unimplemented_stage_is_refused(tmp_path, monkeypatch):
    monkeypatch.delitem(registry.STAGES, "evaluate", raising=False)  # as before the stage existed
    path = write(tmp_path, """
        name: t
        evaluate: {}
    """)
    with pytest.raises(ConfigError, match="stage 'evaluate' is not implemented"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_a_full_form_round_trips():
    """The Prefect UI submits every field, defaults included: that must validate as the same config."""
    for path in ("configs/tiny.yaml", "configs/demo.yaml"):
        config = load_config(path)
        assert validate_config(config.model_dump(mode="json"), "form") == config


TORCH_FREE = """
import sys

def check(after):
    loaded = sorted({"torch", "transformers"} & set(sys.modules))
    assert not loaded, f"{', '.join(loaded)} imported by {after}"

import tasks.registry
check("import tasks.registry")
from flows.cli import status_report
status_report("configs/tiny.yaml")
check("crucible status configs/tiny.yaml")
import flows.pipeline
check("import flows.pipeline (it loads configs/demo.yaml, the flows' default)")
"""


def test_registry_planning_and_flows_leave_torch_unloaded(tmp_home):
    """torch and transformers take seconds to import, so only a running stage loads them: the
    registry, config loading, planning and the flows (``crucible stages``, ``status``, a run whose
    stages are all cached) never do. A fresh interpreter, since this one has them loaded."""
    result = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
