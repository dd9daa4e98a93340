"""The ``pretrain`` stage: crash, rerun from the stage's own checkpoints, export, MLflow registry.

The upstream outputs are written directly in their documented formats (a trained tokenizer
folder; ``index.json`` + ``.npy`` shards), so the test exercises only this stage, through its
real Ray Train run.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from pydantic import ValidationError
from ray.train import TrainingFailedError
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.tokenizer import save_tokenizer, train_tokenizer
from tasks.config import PipelineConfig
from tasks.data.tokenize import MixReport, ShardEntry, SplitIndex, TokenIndex
from tasks.errors import ConfigError
from tasks.stage import Manifest, StageContext
from tasks.store import StageDir
from tasks.tracking import RunLogger, start_run
from tasks.train import pretrain
from tasks.train.order import validation_rows
from tasks.train.loop import FAULT_ENV
from tasks.train.pretrain import PretrainConfig

SEQ_LEN = 32
SUBJECTS = "the cat|a dog|my friend|the old man|a small bird".split("|")
VERBS = "sees|likes|follows|finds|hears".split("|")
OBJECTS = "the ball|a tree|the river|a red house|the moon".split("|")


def _manifest(stage: str, path, files: list[str]) -> Manifest:
    now = datetime.now(timezone.utc)
    return Manifest(
        stage=stage, fingerprint=stage, upstream={}, path=str(path), files=files,
        code_version="1", crucible_version="test", started_at=now, finished_at=now,
    )


def _split(out: StageDir, name: str, stream: list[int]) -> SplitIndex:
    rows = np.asarray(stream[: len(stream) // SEQ_LEN * SEQ_LEN], dtype=np.uint16).reshape(-1, SEQ_LEN)
    out.make(name)
    np.save(out.path(f"{name}/00000.npy"), rows)
    return SplitIndex(shards=[ShardEntry(file=f"{name}/00000.npy", sequences=len(rows))], sequences=len(rows), tokens=rows.size)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A trained tokenizer and ~250 packed sequences of simple sentences."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = random.Random(0)
    texts = [
        " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(1, 4)))
        for _ in range(1200)
    ]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    save_tokenizer(tokenizer, root / "tok" / "tokenizer")
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for i, text in enumerate(texts):
        streams["val" if i % 10 == 0 else "train"] += tokenizer.encode(text) + [tokenizer.eos_token_id]
    tokens = StageDir.at(str(root), "tokenize", "fp")
    splits = {name: _split(tokens, name, stream) for name, stream in streams.items()}
    index = TokenIndex(
        seq_len=SEQ_LEN, dtype="uint16", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        tokenizer=str(root / "tok" / "tokenizer"), splits=splits, mix=MixReport(budget=splits["train"].tokens, domain={}),
    )
    tokens.write_bytes_atomic("index.json", index.model_dump_json().encode())
    return {
        "root": root,
        "tokenizer": _manifest("tokenizer", root / "tok", ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]),
        "tokenize": _manifest("tokenize", tokens.root, ["index.json", "train/00000.npy", "val/00000.npy"]),
        "val_rows": np.load(tokens.path("val/00000.npy")),
    }


def test_config_refuses_unknown_and_tokenizer_owned_fields():
    with pytest.raises(ValidationError, match="vocab_size"):
        PretrainConfig(overrides={"vocab_size": 1000})
    # LlamaConfig's own checks run when the pipeline is planned, not when the config loads
    with pytest.raises(ConfigError, match=r"pretrain.overrides: unknown LlamaConfig field\(s\) in overrides: hidden_dim"):
        pretrain.pretrain_inputs(PretrainConfig(overrides={"hidden_dim": 32}), None)
    with pytest.raises(ConfigError, match="not a multiple of the number of attention heads"):
        pretrain.pretrain_inputs(PretrainConfig(overrides={"hidden_size": 100, "num_attention_heads": 3}), None)
    assert pretrain.pretrain_inputs(PretrainConfig(preset="demo", overrides={"num_hidden_layers": 2}), None) == ""


def _attempt(upstream, cfg: PretrainConfig, out: StageDir, uri: str):
    run_id = start_run(uri, "test-pretrain", "pretrain", None, {})
    ctx = StageContext(
        name="pretrain", config=cfg, pipeline=PipelineConfig(name="tinylm"),
        upstream={"tokenize": upstream["tokenize"], "tokenizer": upstream["tokenizer"]},
        out=out, log=RunLogger(run_id, uri), run_id=run_id,
    )
    return lambda: pretrain.run(ctx), run_id


def test_crash_then_rerun_resumes_exports_and_registers(upstream, ray_session, monkeypatch):
    uri = f"sqlite:///{upstream['root'] / 'mlflow.db'}"
    cfg = PretrainConfig(
        steps=12, batch_size=4, lr=3e-3, warmup_steps=2, num_workers=2, checkpoint_every=4,
        eval_every=6, eval_batches=2, log_every=1, max_failures=0,
    )
    out = StageDir.at(str(upstream["root"]), "pretrain", "fp")
    out.make()

    monkeypatch.setenv(FAULT_ENV, "7")  # a worker dies at step 7: no restarts allowed, the stage fails
    crash, _ = _attempt(upstream, cfg, out, uri)
    with pytest.raises(TrainingFailedError):
        crash()
    assert out.exists("checkpoints/train/step_00000004")
    assert not out.exists("model/config.json")

    monkeypatch.delenv(FAULT_ENV)  # the rerun finds the stage's checkpoints and continues
    rerun, run_id = _attempt(upstream, cfg, out, uri)
    result = rerun()
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(5, 13))  # resumed after step 4, not from 0
    resumed = [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train/resumed_from_step")]
    assert resumed == [(4, 4.0)]
    assert result.tokens == 12 * 2 * 4 * SEQ_LEN
    assert result.metrics["val_loss"] < np.log(len(AutoTokenizer.from_pretrained(out.path("model")))) - 1.0  # learned
    assert 0 < result.metrics["val_unigram_entropy"] < np.log(len(AutoTokenizer.from_pretrained(out.path("model"))))

    model_dir = out.path("model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.vocab_size == len(tokenizer)
    prompt = tokenizer("the cat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    # The exported weights are the trained ones: they reproduce the reported validation loss.
    per_rank = min(len(upstream["val_rows"]) // 2, cfg.batch_size * cfg.eval_batches)
    chosen = validation_rows(len(upstream["val_rows"]), 2 * per_rank)
    rows = torch.from_numpy(upstream["val_rows"][chosen].astype(np.int64))
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss.item()
    assert loss == pytest.approx(result.metrics["val_loss"], abs=1e-4)

    version = MlflowClient(uri).get_model_version_by_alias("tinylm", "pretrain")
    assert version.run_id == run_id and version.source.endswith("/pretrain/fp/model")
