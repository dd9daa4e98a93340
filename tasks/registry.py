"""The stage order and the stages this version implements.

The order is fixed; stages land as they are written. A stage listed in ``STAGE_ORDER`` but
absent from ``STAGES`` is refused with a clear message before anything runs.
"""

from __future__ import annotations

from tasks.data import dedup
from tasks.data import filter as filter_stage
from tasks.data import ingest
from tasks.data import pii
from tasks.data import tokenize, tokenizer
from tasks.eval import evaluate
from tasks.feedback import cai
from tasks.stage import Stage
from tasks.train import align, pretrain, reward, sft

STAGE_ORDER: tuple[str, ...] = (
    "ingest",
    "filter",
    "dedup",
    "pii",
    "tokenizer",
    "tokenize",
    "pretrain",
    "sft",
    "feedback",
    "reward",
    "align",
    "evaluate",
)

STAGES: dict[str, Stage] = {s.name: s for s in (ingest.STAGE, filter_stage.STAGE, dedup.STAGE, pii.STAGE, tokenizer.STAGE, tokenize.STAGE, pretrain.STAGE, sft.STAGE, cai.STAGE, reward.STAGE, align.STAGE, evaluate.STAGE)}
