"""Prefect: the pipeline flow, stage flows, artifacts, deployments (Prefect's test harness); on the chain it runs,
`crucible trace` and the stages' MLflow datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
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
from tasks.data.tokenize import load_token_shards, read_token_index
from tasks.registry import STAGES
from tasks.trace import trace_document
from tasks.tracking import tracking_uri
from tasks.train.order import GlobalOrder, micro_batch_position, validation_indices


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny(tmp_home):
    return load_config("configs/tiny.yaml")


@pytest.fixture(scope="module")
def chain(prefect_server, ray_session, tmp_path_factory):
    """The tiny pipeline run once through Prefect, in a state dir of its own for the module's tests:
    (config, outcomes)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CRUCIBLE_HOME", str(tmp_path_factory.mktemp("chain") / "home"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("RAY_ADDRESS", raising=False)
        config = load_config("configs/tiny.yaml")
        yield config, pipeline(config=config)


def test_pipeline_flow_runs_the_whole_chain_then_skips(chain, capsys):
    """The tiny pipeline end to end through Prefect: what each stage made, then a cached rerun."""
    tiny, first = chain
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


# ------------------------------------------------------------------ crucible trace and MLflow datasets, on the chain's outputs


def _trace(config: PipelineConfig, doc_id: str) -> dict:
    return {s.stage: s for s in trace_document(config, "configs/tiny.yaml", doc_id).stages}


def test_trace_says_why_filter_removed_a_document_and_names_what_is_missing(chain, capsys, tmp_path):
    assert cli.main(["trace", "configs/tiny.yaml", "broken/b1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"filter +removed +gopher_quality:gopher_short_doc \(row in rejected/broken-", printed)
    assert "also quarantined: broken.jsonl:6: repeated id 'broken/b1'" in printed  # a second row with its id
    assert cli.main(["trace", "configs/tiny.yaml", "broken/b1", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("ingest", "kept"), ("filter", "removed")]
    assert (stages[0]["file"], stages[0]["shard"]) == ("broken.jsonl", "documents/broken-00000.parquet")
    removed = pq.read_table(f"{stages[1]['path']}/{stages[1]['shard']}", filters=[("id", "==", "broken/b1")])
    assert removed["reason"].to_pylist() == [stages[1]["reason"]] == ["gopher_quality:gopher_short_doc"]

    quarantined = _trace(chain[0], "broken/b3")["ingest"]  # line 3 of broken.jsonl has no text
    assert quarantined.status == "quarantined" and quarantined.reason == "missing text field 'text'"
    assert cli.main(["trace", "configs/tiny.yaml", "web/nope"]) == 2
    assert "unknown document id 'web/nope'" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(f"base: {Path('configs/tiny.yaml').resolve()}\nstore: {tmp_path / 'store'}\n")
    assert cli.main(["trace", str(elsewhere), "web/w3"]) == 2
    assert "stage 'ingest' has not run yet" in capsys.readouterr().err


def test_trace_names_the_cluster_survivor_of_a_removed_duplicate(chain):
    tiny, first = chain
    dedup = _trace(tiny, "web/w3")["dedup"]  # one of the templated travel notes
    assert (dedup.status, dedup.reason, dedup.method) == ("removed", "near_duplicate", "minhash")
    assert dedup.similarity >= tiny.dedup.threshold
    assert _trace(tiny, dedup.survivor)["dedup"].status == "kept"
    kept = pq.read_table({o.stage: o.manifest for o in first}["dedup"].file_paths("documents"), columns=["id"])["id"].to_pylist()
    assert dedup.survivor in kept and "web/w3" not in kept


def test_trace_finds_every_kept_documents_tokens_and_the_steps_that_read_them(chain):
    """For every document tokenize packed: the tokens at the offsets trace gives are the document's,
    and the steps are those at which the loop's own order (read forwards) takes its sequences."""
    tiny, first = chain
    out, cfg = {o.stage: o.manifest for o in first}, tiny.pretrain
    tokenizer = Tokenizer.from_file(f"{out['tokenizer'].path}/tokenizer/tokenizer.json")
    eos = read_token_index(out["tokenize"]).eos_token_id
    splits = {split: load_token_shards(out["tokenize"], split) for split in ("train", "val")}
    order, size = GlobalOrder(len(splits["train"]), cfg.seed), len(splits["train"])
    forward: dict[int, list[tuple[int, int, int, int]]] = {}  # sequence -> (step from 1, rank, micro-batch, epoch)
    for step in range(cfg.steps):
        for micro in range(cfg.grad_accum):
            for rank in range(cfg.num_workers):
                start = micro_batch_position(step, micro, rank, world=cfg.num_workers, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
                for k, row in enumerate(order.take(start, cfg.batch_size)):
                    forward.setdefault(int(row), []).append((step + 1, rank, micro, (start + k) // size))
    validated = set(np.concatenate([np.concatenate(validation_indices(len(splits["val"]), r, cfg.num_workers, cfg.batch_size, cfg.eval_batches))
                                    for r in range(cfg.num_workers)]).tolist())

    documents = pq.read_table(out["pii"].file_paths("documents"), columns=["id", "text"]).to_pylist()
    for doc in documents:
        trace = _trace(tiny, doc["id"])
        assert [(s, t.status) for s, t in trace.items()][:5] == [(s, "kept") for s in ("ingest", "filter", "dedup", "pii", "tokenize")]
        [copy] = trace["tokenize"].copies  # no mix: each document once
        packed = np.concatenate([np.load(f"{out['tokenize'].path}/{p.shard}")[p.row][p.offset : p.offset + p.tokens] for p in copy.pieces])
        expected = tokenizer.encode(doc["text"], add_special_tokens=False).ids + [eos]
        assert packed.tolist() == expected[: len(packed)] and len(packed) + copy.dropped == len(expected) == copy.length
        sequences = [p.sequence for p in copy.pieces]
        if trace["tokenize"].split == "train":
            reads = {s.sequence: [(r.step, r.rank, r.micro_batch, r.epoch) for r in s.reads] for s in trace["pretrain"].sequences}
            assert reads == {s: forward.get(s, []) for s in sequences}
            assert trace["pretrain"].steps == sorted({r[0] for s in sequences for r in forward.get(s, [])})
        else:
            assert trace["pretrain"].validation == sorted(validated & set(sequences))
    assert any(read[3] == 1 for reads in forward.values() for read in reads)  # the run wraps into a second epoch


def test_each_stage_run_records_its_inputs_and_output_as_mlflow_datasets(chain):
    tiny, first = chain
    out = {o.stage: o.manifest for o in first}
    client = MlflowClient(tracking_uri(tiny.tracking.uri))
    for stage in ("dedup", "tokenize", "pretrain"):
        logged = {
            (d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"], {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for d in client.get_run(out[stage].mlflow_run_id).inputs.dataset_inputs
        }
        read = {(up, fp, out[up].path, "input") for up, fp in out[stage].upstream.items()}
        assert read and logged == read | {(stage, out[stage].fingerprint, out[stage].path, "output")}, stage


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
