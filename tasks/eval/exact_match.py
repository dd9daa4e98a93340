"""Generative exact match with answer extraction (GSM8K style).

Row format (JSONL): ``{"prompt": str, "answer": str | number, "id": str?}``. The reference goes
through the same extraction as the reply, so a full GSM8K solution ending in ``#### 72`` and a
bare ``72`` are both fine.

Metrics: ``exact_match`` (greedy reply), ``exact_match_sampled`` (mean over ``samples`` sampled
replies) and ``maj@<samples>`` (the majority answer of the samples, self-consistency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from tasks.eval.scoring import Extraction, extract_answer, majority, same_answer
from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput, mean

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel



class AnswerRow(Row):
    prompt: str = Field(..., min_length=1)
    answer: str

    @field_validator("answer", mode="before")
    @classmethod
    def _numbers_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class ExactMatchSuite(SuiteBase):
    """Generate, extract the final answer, compare with the reference."""

    row_model = AnswerRow
    kind: Literal["exact_match"] = "exact_match"
    extract: Extraction = Field("auto", description="auto: after '####' if present, else the last number")
    max_new_tokens: int = Field(64, ge=1)
    samples: int = Field(4, ge=0, description="sampled replies per prompt besides the greedy one; 0: greedy only")
    temperature: float = Field(0.7, gt=0, description="temperature of the sampled replies")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, description="strings that end a reply (besides EOS/<|end|>)")
    chat: bool = Field(True, description="use the chat template for chat models")

    def evaluate(self, lm: LanguageModel, rows: list[AnswerRow], settings: EvalSettings) -> SuiteOutput:
        prompts = [row.prompt for row in rows]
        chat = self.chat and lm.spec.chat
        common = {"chat": chat, "max_new_tokens": self.max_new_tokens, "stop": self.stop, "seed": settings.seed}
        greedy = lm.generate(prompts, **common)
        sampled = (
            lm.generate(prompts, samples=self.samples, temperature=self.temperature, top_p=self.top_p, **common)
            if self.samples else [[] for _ in rows]
        )
        greedy_hits, sampled_hits, majority_hits, samples = [], [], [], []
        for row, [reply], replies in zip(rows, greedy, sampled):
            reference = extract_answer(row.answer, self.extract)
            predicted = extract_answer(reply, self.extract)
            greedy_hits.append(float(same_answer(predicted, reference)))
            answers = [extract_answer(r, self.extract) for r in replies]
            sampled_hits.extend(float(same_answer(a, reference)) for a in answers)
            majority_hits.append(float(same_answer(majority(answers), reference)))
            samples.append({"id": row.id, "prompt": row.prompt, "reference": reference, "reply": reply,
                            "predicted": predicted, "sampled_answers": answers})
        metrics = {"exact_match": mean(greedy_hits)}
        if self.samples:
            metrics["exact_match_sampled"] = mean(sampled_hits)
            metrics[f"maj@{self.samples}"] = mean(majority_hits)
        return SuiteOutput(metrics, samples)
