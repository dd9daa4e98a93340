"""Multiple choice scored by log-likelihood (MMLU / ARC / HellaSwag style).

Row format (JSONL): ``{"question": str, "choices": [str, …], "answer": int, "id": str?}`` where
``answer`` is the index of the right choice. Each choice is scored as the continuation
``question + delimiter + choice``; put any prompt scaffolding ("Question: …\\nAnswer:") in
``question``.

Metrics: ``acc`` (highest total log-likelihood), ``acc_char`` (per character of the choice,
lm-eval's ``acc_norm``) and ``acc_token`` (per token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tasks.eval.scoring import choose
from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput, mean

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel



class ChoiceRow(Row):
    question: str
    choices: list[str] = Field(..., min_length=2)
    answer: int = Field(..., ge=0)

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> ChoiceRow:
        if self.answer >= len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index of the {len(self.choices)} choices")
        if any(not c for c in self.choices):
            raise ValueError("choices must not be empty strings")
        return self


class ChoiceSuite(SuiteBase):
    """Pick the choice the model finds most likely, raw and length-normalised."""

    row_model = ChoiceRow
    kind: Literal["multiple_choice"] = "multiple_choice"
    delimiter: str = Field(" ", description="text between the question and each choice (lm-eval's target_delimiter)")

    def evaluate(self, lm: LanguageModel, rows: list[ChoiceRow], settings: EvalSettings) -> SuiteOutput:
        pairs = [(row.question, self.delimiter + choice) for row in rows for choice in row.choices]
        scored = iter(lm.loglikelihood(pairs))
        hits: dict[str, list[float]] = {"acc": [], "acc_char": [], "acc_token": []}
        samples = []
        for row in rows:
            results = [next(scored) for _ in row.choices]
            logprobs = [lp for lp, _ in results]
            picks = {
                "acc": choose(logprobs),
                "acc_char": choose(logprobs, [len(c) for c in row.choices]),
                "acc_token": choose(logprobs, [n for _, n in results]),
            }
            for metric, pick in picks.items():
                hits[metric].append(float(pick == row.answer))
            samples.append({"id": row.id, "answer": row.answer, "logprobs": logprobs, **{f"pick_{k}": v for k, v in picks.items()}})
        return SuiteOutput({metric: mean(values) for metric, values in hits.items()}, samples)
