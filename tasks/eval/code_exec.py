"""Code completion scored by executing tests: pass@k (HumanEval style).

Row format (JSONL, HumanEval's own): ``{"task_id": str, "prompt": str, "test": str,
"entry_point": str, "canonical_solution": str?}``. ``prompt`` is the function's signature and
docstring; the model writes the body; ``test`` defines ``check(candidate)``, which asserts.
The program ``prompt + completion + test + check(entry_point)`` runs in the sandbox
(``tasks/eval/sandbox.py``): a sample passes when it exits cleanly within the limits *and* the
program ran to its last statement, ``check(entry_point)``, which returned: the sandbox's harness
prints a per-run secret token only then, and the pass needs it. A completion that leaves early
(``sys.exit(0)``, ``os._exit(0)``, ``raise SystemExit``, at import or inside the function) is a
failed sample, as is one that reads files outside its folder and the Python installation.

Metrics: ``pass@k`` for every configured k (the unbiased estimator over ``samples`` replies per
task), and ``sandbox.<status>``: the share of samples that timed out, hit the memory limit …
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tasks.eval.sandbox import run_program
from tasks.eval.scoring import pass_at_k
from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput, mean

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel


HUMANEVAL_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]


class CodeRow(Row):
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


def program(row: CodeRow, completion: str) -> str:
    """The file the sandbox runs for one completion."""
    return f"{row.prompt}{completion}\n\n{row.test}\n\ncheck({row.entry_point})\n"


class CodeSuite(SuiteBase):
    """Sample completions, run each against the task's tests in the sandbox."""

    row_model = CodeRow
    kind: Literal["code"] = "code"
    samples: int = Field(5, ge=1, description="completions per task (n of pass@k)")
    k: list[int] = Field(default_factory=lambda: [1], min_length=1, description="the k of each pass@k reported")
    temperature: float = Field(0.8, ge=0, description="0: greedy (then samples must be 1)")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=lambda: list(HUMANEVAL_STOP), description="strings that end a completion")
    workers: int = Field(2, ge=1, description="sandboxed programs run at once")

    @model_validator(mode="after")
    def _k_fits(self) -> CodeSuite:
        if max(self.k) > self.samples:
            raise ValueError(f"pass@{max(self.k)} needs at least {max(self.k)} samples (samples: {self.samples})")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion: set samples to 1")
        return self

    def evaluate(self, lm: LanguageModel, rows: list[CodeRow], settings: EvalSettings) -> SuiteOutput:
        completions = lm.generate(
            [row.prompt for row in rows], chat=False, max_new_tokens=self.max_new_tokens, samples=self.samples,
            temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=settings.seed,
        )
        jobs = [(row, c) for row, replies in zip(rows, completions) for c in replies]
        with ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(lambda job: run_program(program(*job), settings.sandbox), jobs))
        outcome = iter(zip(jobs, results))
        estimates: dict[int, list[float]] = {k: [] for k in self.k}
        statuses: Counter[str] = Counter(r.status for r in results)
        samples = []
        for row in rows:
            runs = [next(outcome) for _ in range(self.samples)]
            correct = sum(result.passed for _, result in runs)
            for k in self.k:
                estimates[k].append(pass_at_k(self.samples, correct, k))
            for (_, completion), result in runs:
                samples.append({"id": row.task_id, "completion": completion, "status": result.status,
                                "detail": result.detail, "isolation": result.isolation})
        metrics = {f"pass@{k}": mean(values) for k, values in estimates.items()}
        metrics.update({f"sandbox.{status}": count / len(results) for status, count in sorted(statuses.items())})
        return SuiteOutput(metrics, samples)
