"""The shared training loop: presets, FLOPs, schedule, data order, and real Ray Train runs.

Ray runs (2 CPU workers, gloo) train the ``tiny`` preset on sequences that are arithmetic
progressions mod 64, which it learns within a few dozen steps. One DDP run is the reference:
DeepSpeed ZeRO-2 must reach the same losses, and an FSDP run whose worker is killed mid-run
must resume from its latest checkpoint and end on the same losses too.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from ray import cloudpickle
from transformers import AutoModelForCausalLM

from models.flops import matmul_parameter_count, parameter_count, training_flops_per_token
from models.presets import PRESETS, build_model, model_config
from tasks.data.tokenize import TokenShards
from tasks.tracking import RunLogger, start_run
from tasks.train.data import PackedSequences
from tasks.train.order import (
    GlobalOrder,
    micro_batch_of,
    micro_batch_position,
    positions_of,
    validation_indices,
    validation_rows,
)
from tasks.train.loop import FAULT_ENV, TrainJob, run_training
from tasks.train.objectives import NextToken
from tasks.train.optim import warmup_cosine
from tasks.train.settings import StrategyConfig, TrainConfig

VOCAB, SEQ_LEN = 64, 32
# DDP and ZeRO-2 (and FSDP) in fp32 run the same arithmetic up to reduction order.
LOSS_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_built_model(preset, tied):
    with torch.device("meta"):
        model = build_model(preset, 32_000, tie_word_embeddings=tied)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_preset_sizes_and_flops():
    millions = {p: parameter_count(model_config(p, 32_000)) / 1e6 for p in PRESETS}
    assert millions["tiny"] < 3 and 2 < millions["demo"] < 15
    assert 100 < millions["124m"] < 140 and 300 < millions["350m"] < 400 and 900 < millions["1b"] < 1300
    config = model_config("tiny", VOCAB)  # d=64, 2 layers, 4 heads of 16, 2 KV heads, SwiGLU 176
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176
    assert matmul_parameter_count(config) == 2 * per_layer + VOCAB * 64
    assert training_flops_per_token(config, SEQ_LEN) == 6 * (2 * per_layer + VOCAB * 64) + 12 * 2 * 64 * SEQ_LEN


def test_unknown_preset_or_override_is_refused():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("7b", 100)
    with pytest.raises(ValueError, match="num_layers"):
        model_config("tiny", 100, num_layers=3)


def test_warmup_then_cosine_to_the_floor():
    lrs = [warmup_cosine(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[20] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_global_order_shards_batches_without_overlap_and_resumes_anywhere():
    order = GlobalOrder(50, seed=3)
    first_epoch = order.take(0, 50)
    assert sorted(first_epoch) == list(range(50))
    assert not np.array_equal(first_epoch, order.take(50, 50))  # a new permutation per epoch
    assert np.array_equal(GlobalOrder(50, seed=3).take(45, 10), np.concatenate([first_epoch[45:], order.take(50, 5)]))

    world, batch, accum = 2, 3, 2  # global batch 12
    for step in (0, 1, 7):
        positions = sorted(
            p
            for micro in range(accum)
            for rank in range(world)
            for p in range(
                micro_batch_position(step, micro, rank, world=world, batch_size=batch, grad_accum=accum),
                micro_batch_position(step, micro, rank, world=world, batch_size=batch, grad_accum=accum) + batch,
            )
        )
        assert positions == list(range(step * 12, (step + 1) * 12))


def test_positions_of_and_micro_batch_of_invert_the_loops_reads():
    """Which step, worker and micro-batch read a row, found backwards, is what reading forwards
    (as ``_train_step`` takes batches) finds, over three epochs of wrap-around."""
    order, world, batch, accum, steps = GlobalOrder(50, seed=3), 2, 3, 2, 12  # 144 reads of 50 rows
    forward = sorted(
        (step, micro, rank, int(row))
        for step in range(steps) for micro in range(accum) for rank in range(world)
        for row in order.take(micro_batch_position(step, micro, rank, world=world, batch_size=batch, grad_accum=accum), batch)
        if row in (4, 31)
    )
    positions, rows = positions_of(order, np.array([31, 4]), steps * world * batch * accum)
    step, micro, rank = micro_batch_of(positions, world=world, batch_size=batch, grad_accum=accum)
    assert sorted(zip(step.tolist(), micro.tolist(), rank.tolist(), rows.tolist())) == forward
    assert np.all(np.diff(positions) > 0) and rows.tolist().count(4) == 3  # once in each epoch it reaches …
    assert rows.tolist().count(31) == 2  # … and row 31's slot in the third epoch comes after the last step


def test_validation_is_split_evenly_across_ranks():
    shares = [validation_indices(23, rank, 2, batch_size=4, batches=5) for rank in range(2)]
    assert len(shares[0]) == len(shares[1])  # same number of forward passes on every rank
    flat = [np.concatenate(s) for s in shares]
    assert len(flat[0]) == len(flat[1]) == 11
    assert not set(flat[0]) & set(flat[1])
    few = np.concatenate([np.concatenate(validation_indices(100, r, 2, batch_size=2, batches=2)) for r in range(2)])
    assert sorted(few.tolist()) == [0, 12, 25, 37, 50, 62, 75, 87]  # spread over the whole set, not a prefix


# ---------------------------------------------------------------------------------- Ray Train runs


def progressions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, VOCAB, (n, 1)), rng.integers(1, 4, (n, 1))
    return ((start + stride * np.arange(SEQ_LEN)) % VOCAB).astype(np.uint16)


def token_rows(path, rows: np.ndarray) -> PackedSequences:
    np.save(path, rows)
    return PackedSequences(TokenShards([str(path)], [len(rows)], SEQ_LEN, "uint16"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "train": token_rows(root / "train.npy", progressions(512, 0)),
        "val": token_rows(root / "val.npy", progressions(64, 1)),
    }


class NextTokenCounted(NextToken):
    """Next-token loss plus a metric with a known value, to check the loop averages objective metrics.

    (Ray workers cannot import this test module: the ``setup`` fixture has it pickled by value.)
    """

    def compute(self, model, batch):
        out = super().compute(model, batch)
        out.metrics["counted_tokens"] = out.tokens.float()
        return out


def train(setup, name: str, strategy: str, export: bool = False, **overrides):
    cfg = TrainConfig(
        steps=16, batch_size=8, lr=3e-3, warmup_steps=3, num_workers=2, checkpoint_every=5,
        eval_every=8, eval_batches=2, log_every=1, price_per_device_hour=2.0,
        strategy=StrategyConfig(kind=strategy), **overrides,
    )
    run_id = start_run(setup["uri"], "test-train", name, None, {})
    job = TrainJob(
        config=cfg, build_model=partial(build_model, "tiny", VOCAB), objective=NextTokenCounted(),
        train_data=setup["train"], val_data=setup["val"], logger=RunLogger(run_id, setup["uri"]),
        export_path=str(setup["root"] / name / "model") if export else None,
    )
    outcome = run_training(job, str(setup["root"] / name))
    return outcome, run_id


def history(setup, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(setup["uri"]).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def ddp(setup, ray_session):
    """(outcome, run id, wall seconds of the whole run)."""
    started = time.monotonic()
    outcome, run_id = train(setup, "ddp", "ddp")
    return outcome, run_id, time.monotonic() - started


def test_ddp_learns_and_logs_every_metric(setup, ddp):
    outcome, run_id, wall_s = ddp
    losses = [v for _, v in sorted(history(setup, run_id, "train/loss"))]
    assert len(losses) == 16
    assert losses[0] > math.log(VOCAB) - 0.3  # starts near chance …
    assert losses[-1] < 0.7 * losses[0]  # … and learns
    val = dict(history(setup, run_id, "val/loss"))
    assert sorted(val) == [8, 16] and val[16] < val[8] < math.log(VOCAB)
    assert outcome.metrics["val/perplexity"] == pytest.approx(math.exp(outcome.metrics["val/loss"]))

    lrs = dict(history(setup, run_id, "train/lr"))  # the rate each step used: warm-up, then cosine
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert lrs[16] == pytest.approx(3e-3 * warmup_cosine(15, warmup=3, total=16, min_ratio=0.1))
    assert outcome.metrics["train/tokens_seen"] == 16 * 2 * 8 * SEQ_LEN
    # Throughput, MFU and cost follow from the step times: a step's tokens/s is its tokens over its
    # time, the run's mean is over training time alone, MFU is model FLOP/s over the peak of 2
    # devices, and the cost is the attempt's wall time (training and the rest) at $2 a device-hour.
    step_tokens = 2 * 8 * SEQ_LEN
    tokens_per_s = dict(history(setup, run_id, "train/tokens_per_s"))
    training_s = sum(step_tokens / tokens_per_s[step] for step in range(1, 17))
    assert outcome.metrics["train/mean_tokens_per_s"] == pytest.approx(16 * step_tokens / training_s, rel=1e-6)
    flops_per_token = training_flops_per_token(model_config("tiny", VOCAB), SEQ_LEN)
    for step, value in history(setup, run_id, "train/mfu"):
        assert value == pytest.approx(tokens_per_s[step] * flops_per_token / (1e12 * 2), rel=1e-6), step
    attempt_s = outcome.metrics["train/cost_usd"] / 2.0 / 2 * 3600
    assert training_s < attempt_s < wall_s
    # The logged gradient norm is that of the whole step's gradient: step 1's, recomputed here from
    # the same initial weights on the 16 sequences the two workers took.
    torch.manual_seed(0)
    model = build_model("tiny", VOCAB)
    NextToken().compute(model, setup["train"].collate(GlobalOrder(len(setup["train"]), 0).take(0, 16))).loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert dict(history(setup, run_id, "train/grad_norm"))[1] == pytest.approx(norm.item(), rel=1e-4)
    assert outcome.metrics["train/counted_tokens"] == outcome.metrics["val/counted_tokens"] == 8 * (SEQ_LEN - 1)
    checkpoints = sorted(p.name for p in (setup["root"] / "ddp" / "train").glob("step_*"))
    assert checkpoints == ["step_00000015", "step_00000016"]  # the last two kept


def test_deepspeed_zero2_matches_ddp(setup, ddp):
    outcome, _ = train(setup, "zero2", "deepspeed")
    for key in ("train/loss", "val/loss"):
        assert outcome.metrics[key] == pytest.approx(ddp[0].metrics[key], abs=LOSS_TOLERANCE), key


def test_killed_worker_resumes_from_the_latest_checkpoint(setup, ddp, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "8")  # the last worker dies at step 8; the checkpoint is step 5
    outcome, run_id = train(setup, "fsdp-killed", "fsdp", export=True, max_failures=1)
    logged = [step for step, _ in history(setup, run_id, "train/loss")]
    # First attempt: steps 1-7, then the crash; second attempt: from the step-5 checkpoint.
    assert {s: logged.count(s) for s in range(1, 17)} == {s: 2 if s in (6, 7) else 1 for s in range(1, 17)}
    assert outcome.metrics["step"] == 16
    for key in ("train/loss", "val/loss"):
        assert outcome.metrics[key] == pytest.approx(ddp[0].metrics[key], abs=LOSS_TOLERANCE), key

    # The export gathers FSDP's shards: the HF model reproduces the reported validation loss.
    model = AutoModelForCausalLM.from_pretrained(setup["root"] / "fsdp-killed" / "model").eval()
    rows = setup["val"].collate(validation_rows(len(setup["val"]), 2 * 2 * 8))["input_ids"]  # what 2 workers x 2 batches of 8 saw
    with torch.no_grad():
        assert model(input_ids=rows, labels=rows).loss.item() == pytest.approx(outcome.metrics["val/loss"], abs=1e-4)
