"""Prefect: the pipeline flow, stage flows, artifacts, deployments (Prefect's test harness)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness
from tokenizers import Tokenizer

import flows  # noqa: F401
from deployments.serve import load_deployments
from flows import cli
from flows.pipeline import pipeline, rerun_stage
from flows.stages import STAGE_FLOWS
from tasks.config import PipelineConfig, load_config
from tasks.registry import STAGES
from tasks.tracking import tracking_uri


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny(tmp_home):
    return load_config("configs/tiny.yaml")



def test_pipeline_flow_runs_the_whole_chain_then_skips(tiny, ray_session, capsys):
    """The tiny pipeline end to end through Prefect: what each stage made, then a cached rerun."""
    first = pipeline(config=tiny)
    assert [(o.stage, o.state) for o in first] == [(s, "ran") for s in tiny.configured_stages()]
    out = {o.stage: o.manifest for o in first}
    assert out["ingest"].rows == 52
    assert 0 < out["filter"].rows < out["ingest"].rows
    assert out["dedup"].rows < out["filter"].rows  # the templated travel notes are near-duplicates
    # tokenize packs every document pii kept, each followed by EOS, into rows of 64 tokens; each
    # split drops only the tail that does not fill a row
    tokenizer = Tokenizer.from_file(f"{out['tokenizer'].path}/tokenizer/tokenizer.json")
    texts = pq.read_table(out["pii"].file_paths("documents"), columns=["text"])["text"].to_pylist()
    stream = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    counts = out["tokenize"].counts
    assert counts["documents.train"] + counts["documents.val"] == out["pii"].rows == len(texts)
    dropped = [counts["dropped_tokens.train"], counts["dropped_tokens.val"]]
    assert out["tokenize"].tokens == stream - sum(dropped) and max(dropped) < 64 and out["tokenize"].tokens % 64 == 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = f"{out['pretrain'].path}/model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    scores = json.loads(open(f"{out['evaluate'].path}/scores.json").read())
    assert "pretrain" in scores

    second = pipeline(config=tiny, force=["ingest"], until_stage="ingest")
    assert [(o.stage, o.state) for o in second] == [("ingest", "ran")]
    third = pipeline(config=tiny)
    assert {o.state for o in third} == {"cached"}
    assert [o.manifest for o in third][1:] == [o.manifest for o in first][1:]

    with get_client(sync_client=True) as client:
        latest = {a.key: a for a in sorted(client.read_artifacts(), key=lambda a: a.created)}
    assert latest["tiny-pipeline"].type == "table"
    assert "evaluate" in str(latest["tiny-pipeline"].data)
    assert latest["tiny-ingest"].type == "markdown"
    assert latest["tiny-ingest"].data.startswith("# ingest — cached")  # the cached rerun's page keeps the stage's report
    assert "Ingested **52** documents" in latest["tiny-ingest"].data

    capsys.readouterr()
    with get_client(sync_client=True) as client:
        flow_runs = len(client.read_flow_runs())
    assert cli.main(["run", "configs/tiny.yaml"]) == 0  # the CLI's run ends with the summary and the report card
    printed = capsys.readouterr().out
    assert f"ran 0 (-), cached {len(first)}" in printed and out["evaluate"].path in printed
    assert "nothing to run (Prefect not started)" in printed
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == flow_runs  # all complete: the CLI skipped the flow, MLflow still records it
    mlflow = MlflowClient(tracking_uri(tiny.tracking.uri))
    parents = mlflow.search_runs(
        [mlflow.get_experiment_by_name(tiny.name).experiment_id],
        filter_string="tags.`crucible.kind` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1,
    )
    assert parents[0].data.metrics["stages_cached"] == len(first)
    card = open(f"{out['evaluate'].path}/report_card.md").read()
    assert printed.rstrip().endswith(card.rstrip()) and card.startswith("## Report card")


def test_stage_flow_alone_and_rerun_flow(tiny, ray_session):
    outcome = STAGE_FLOWS["ingest"](config=tiny)
    assert outcome.manifest.stage == "ingest"
    again = rerun_stage(stage="ingest", config=tiny)
    assert again.state == "ran"
    assert again.manifest.fingerprint == outcome.manifest.fingerprint


def test_bad_parameter_is_rejected_before_running(tiny):
    bad = tiny.model_dump(mode="json")
    bad["ingest"]["sources"][0]["colour"] = "blue"
    with pytest.raises(Exception, match="colour"):
        pipeline(config=bad)
    with pytest.raises(Exception, match="until_stage"):
        pipeline(config=tiny, until_stage="nope")


def test_prefect_yaml_deployments_import_and_expose_the_config():
    spec = yaml.safe_load(open("prefect.yaml"))
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"full-pipeline", "nightly-data-refresh", "rerun-stage"}
    deployments = {d.name: d for d in load_deployments()}
    for name, deployment in deployments.items():
        schema = deployment._parameter_openapi_schema.model_dump()
        config_schema = schema["definitions"]["PipelineConfig"]["properties"]
        assert set(STAGES) <= set(config_schema), name
        assert {"name", "store", "tracking", "ray"} <= set(config_schema)
    [cron] = deployments["nightly-data-refresh"].schedules
    assert cron.schedule.cron == "0 2 * * *"
    assert deployments["nightly-data-refresh"].parameters == {"until_stage": "pii"}


def test_flow_default_config_is_the_demo_config():
    assert pipeline.parameters.properties["config"]["default"]["name"] == "demo"
    assert PipelineConfig.model_validate(pipeline.parameters.properties["config"]["default"]) == load_config("configs/demo.yaml")
