"""The Ray Data actor of the feedback stage: one policy (and judge) per actor, batches of prompts.

Each batch goes through both phases at once, batched across its prompts:

- supervised (SL-CAI): a sampled reply; then per round a greedy critique under the row's drawn
  principle and a greedy revision; the last revision is the row's training reply;
- preferences (RL-CAI): two sampled replies, judged in both orders (``PrincipleJudge``).

Rows of preference pairs with a known answer (``agreement``) are judged the same way, chosen
first: the judge's probability for the chosen reply measures how often it agrees with the label.
Rows travel as one JSON column: the stage, not Ray, owns their schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.feedback.constitution import Constitution
from tasks.feedback.judge import PrincipleJudge
from tasks.feedback.prompts import critique_conversation, revision_conversation


@dataclass(frozen=True)
class Generation:
    """How the actors generate (a plain dataclass: it travels to them pickled)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    revisions: int
    preferences: bool
    device: str
    batch_size: int


class FeedbackWorker:
    def __init__(self, policy: str, judge: str, constitution: Constitution, generation: Generation):
        from tasks.eval.lm import LanguageModel, ModelSpec
        from tasks.train.post_stage import materialize

        def load(path: str) -> LanguageModel:
            return LanguageModel(ModelSpec("feedback", materialize(path), chat=True), generation.device, generation.batch_size)

        self.policy = load(policy)
        self.judge = PrincipleJudge(self.policy if judge == policy else load(judge))
        self.constitution, self.generation = constitution, generation

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [json.loads(r) for r in batch.column("row").to_pylist()]
        prompts = [r for r in rows if r["task"] == "prompt"]
        if prompts and self.generation.revisions:
            self._supervised(prompts)
        if prompts and self.generation.preferences:
            self._preferences(prompts)
        known = [r for r in rows if r["task"] == "agreement"]
        if known:
            principles = [self.constitution.by_name(r["principle"]) for r in known]
            chosen = self.judge.prefer([r["prompt"] for r in known], [r["chosen"] for r in known], [r["rejected"] for r in known], principles)
            for row, p in zip(known, chosen):
                row["p_chosen"] = p
        return pa.table({"row": [json.dumps(r, ensure_ascii=False) for r in rows]})

    def _sample(self, rows: list[dict[str, Any]], conversations: list[Any], samples: int = 1, greedy: bool = False) -> list[list[str]]:
        """Replies to ``conversations``, seeded by the batch's first row and how many replies are drawn."""
        g = self.generation
        return self.policy.generate(
            conversations, chat=True, max_new_tokens=g.max_new_tokens, samples=samples,
            temperature=0.0 if greedy else g.temperature, top_p=g.top_p, seed=rows[0]["seed"] + samples,
        )

    def _supervised(self, rows: list[dict[str, Any]]) -> None:
        current = [replies[0] for replies in self._sample(rows, [r["prompt"] for r in rows])]
        for row, reply in zip(rows, current):
            row["response"], row["rounds"] = reply, []
        for round_ in range(self.generation.revisions):
            principles = [self.constitution.by_name(r["critique_principles"][round_]) for r in rows]
            critiques = [c[0] for c in self._sample(rows, [
                critique_conversation(r["prompt"], reply, p) for r, reply, p in zip(rows, current, principles)
            ], greedy=True)]
            current = [c[0] for c in self._sample(rows, [
                revision_conversation(r["prompt"], reply, critique, p)
                for r, reply, critique, p in zip(rows, current, critiques, principles)
            ], greedy=True)]
            for row, p, critique, revision in zip(rows, principles, critiques, current):
                row["rounds"].append({"principle": p.name, "critique": critique, "revision": revision})

    def _preferences(self, rows: list[dict[str, Any]]) -> None:
        pairs = self._sample(rows, [r["prompt"] for r in rows], samples=2)
        principles = [self.constitution.by_name(r["principle"]) for r in rows]
        first = self.judge.prefer([r["prompt"] for r in rows], [p[0] for p in pairs], [p[1] for p in pairs], principles)
        for row, replies, p in zip(rows, pairs, first):
            row["replies"], row["p_first"] = replies, p
