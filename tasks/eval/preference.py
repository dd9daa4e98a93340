"""Preference pairs: does the model find the chosen reply likelier than the rejected one?

Row format (JSONL): ``{"prompt": str, "chosen": str, "rejected": str, "id": str?}`` — the
format the ``reward`` and ``align`` stages train on, so their held-out split can be a suite.

Metrics per model: ``accuracy`` (share of pairs where log p(chosen | prompt) > log p(rejected |
prompt)) and ``logp_margin`` (mean difference). The stage then adds, for each model with a
predecessor in the chain (``align`` after ``sft``, ``sft`` after ``pretrain``),
``reward_accuracy`` and ``reward_margin``: DPO's implicit reward, β-free,
``(log π(c) − log π_prev(c)) − (log π(r) − log π_prev(r))``: did this stage move the model
towards the chosen replies?
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput, mean

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel


class PreferenceRow(Row):
    prompt: str = Field(..., min_length=1)
    chosen: str = Field(..., min_length=1)
    rejected: str = Field(..., min_length=1)


class PreferenceSuite(SuiteBase):
    """Log-likelihood of each reply given the prompt (chat template for chat models)."""

    row_model = PreferenceRow
    kind: Literal["preference"] = "preference"
    chat: bool = Field(True, description="use the chat template for chat models")

    def evaluate(self, lm: LanguageModel, rows: list[PreferenceRow], settings: EvalSettings) -> SuiteOutput:
        chat = self.chat and lm.spec.chat
        prompts = [row.prompt for row in rows]
        chosen = lm.reply_logprobs(prompts, [row.chosen for row in rows], chat)
        rejected = lm.reply_logprobs(prompts, [row.rejected for row in rows], chat)
        samples = [
            {"id": row.id, "logp_chosen": c, "logp_rejected": r} for row, c, r in zip(rows, chosen, rejected)
        ]
        metrics = {
            "accuracy": mean([float(c > r) for c, r in zip(chosen, rejected)]),
            "logp_margin": mean([c - r for c, r in zip(chosen, rejected)]),
        }
        return SuiteOutput(metrics, samples)


def implicit_reward(samples: list[dict], reference: list[dict]) -> dict[str, float]:
    """``reward_accuracy`` and ``reward_margin`` of a model's samples against its reference's (same rows, same order)."""
    margins = [
        (s["logp_chosen"] - ref["logp_chosen"]) - (s["logp_rejected"] - ref["logp_rejected"])
        for s, ref in zip(samples, reference, strict=True)
    ]
    return {"reward_accuracy": mean([float(m > 0) for m in margins]), "reward_margin": mean(margins)}
