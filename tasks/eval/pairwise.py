"""Pairwise comparison of checkpoints on held-out prompts ("arena"), ranked by Elo.

Row format (JSONL): ``{"prompt": str, "id": str?}``.

Every model answers every prompt (greedy, through its chat template if it is a chat model); for
every prompt and every pair of models a judge decides which reply is better. Two model judges can
be configured (``judge:`` on the suite or on ``evaluate``; which one an arena uses, and when human
votes replace it, is ``tasks/eval/arena.py``):

- ``reward_model``: a reward model scores each reply; the higher score wins (a tie within the
  suite's ``tie_margin``). Adds the metric ``reward`` (mean score).
- ``principle``: any causal LM answers a constitution's multiple-choice question for each pair, in
  both orders (``tasks/feedback/judge.py``); a tie when its probability is within ``tie_margin``
  of 0.5. Judging against written principles keeps the arena apart from the reward that PPO/GRPO
  optimise, so a policy that games that reward cannot rate itself up.

Metrics per model: ``elo`` (mean over shuffled game orders, ``tasks/eval/elo.py``), ``win_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tasks.errors import ConfigError
from tasks.eval.elo import Game, elo_ratings, win_rates
from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput, mean
from tasks.stage import DIGESTED

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel
    from tasks.feedback.constitution import Principle
    from tasks.feedback.judge import PrincipleJudge

Replies = dict[str, list[dict[str, Any]]]
"""model -> its samples of one pairwise suite (``id``, ``prompt``, ``reply``), in row order."""


@dataclass(frozen=True)
class JudgeRun:
    """How a judge model runs: from ``evaluate``'s settings."""

    device: str = "auto"
    batch_size: int = 8
    max_length: int | None = None


@dataclass
class Verdicts:
    """A judge's games (one record per prompt and pair of models), metrics per model, and the
    replies annotated with what the judge read from each (the reward model's score)."""

    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, float]]
    replies: Replies

    def games(self) -> list[Game]:
        return [Game(r["a"], r["b"], r["score_a"]) for r in self.records]


def _pairs(replies: Replies):
    """(model a, model b, prompt index) for every pair of models (sorted names) and every prompt."""
    for a, b in combinations(sorted(replies), 2):
        for i in range(len(replies[a])):
            yield a, b, i


class RewardModelJudge(BaseModel):
    """A reward model folder (a one-logit sequence classifier, as the ``reward`` stage writes)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["reward_model"] = "reward_model"
    path: str = Field(..., description="reward-model folder (local Hugging Face format)", json_schema_extra=DIGESTED)

    def describe(self) -> str:
        return f"reward model `{self.path}`"

    def verdicts(self, suite: PairwiseSuite, replies: Replies, run: JudgeRun) -> Verdicts:
        """Score every reply; per prompt and pair, the higher score wins (a tie within the suite's ``tie_margin``)."""
        from tasks.eval.lm import RewardJudge
        from tasks.train.post_stage import materialize

        judge = RewardJudge(materialize(str(Path(self.path).expanduser())), run.device, run.batch_size)
        rewards = {}
        for model, samples in replies.items():
            rewards[model] = judge.score([s["prompt"] for s in samples], [s["reply"] for s in samples])
            for sample, reward in zip(samples, rewards[model]):
                sample["reward"] = reward
        records = []
        for a, b, i in _pairs(replies):
            ra, rb = rewards[a][i], rewards[b][i]
            score = 0.5 if abs(ra - rb) <= suite.tie_margin else float(ra > rb)
            records.append({"id": replies[a][i]["id"], "a": a, "b": b, "score_a": score, "reward_a": ra, "reward_b": rb})
        return Verdicts(records, {m: {"reward": mean(r)} for m, r in rewards.items()}, replies)


class PrincipleJudgeConfig(BaseModel):
    """A causal LM judging reply pairs against a constitution's principles (RL-CAI's judge)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["principle"] = "principle"
    path: str = Field(
        ..., description="the judge: any local Hugging Face causal-LM folder (its chat template when it has one)",
        json_schema_extra=DIGESTED,
    )
    constitution: str = Field(..., description="constitution YAML (tasks/feedback/constitution.py)", json_schema_extra=DIGESTED)
    principles: list[str] = Field(default_factory=list, description="principles judged under (p averaged); empty: every one")
    tie_margin: float = Field(0.05, ge=0, lt=0.5, description="a tie when P(a better) is within this of 0.5")

    def describe(self) -> str:
        names = ", ".join(self.principles) or "every principle"
        return f"principle judge `{self.path}` (constitution `{self.constitution}`: {names})"

    def load_principles(self, field: str = "evaluate.judge") -> list[Principle]:
        """The principles named (every one when none is), read from the constitution file."""
        from tasks.feedback.constitution import load_constitution

        constitution = load_constitution(self.constitution, f"{field}.constitution")
        known = {p.name: p for p in constitution.principles}
        unknown = [n for n in self.principles if n not in known]
        if unknown:
            raise ConfigError("config", [(f"{field}.principles", f"not in {self.constitution}: {', '.join(unknown)}")])
        return [known[n] for n in self.principles] if self.principles else constitution.principles

    def verdicts(self, suite: PairwiseSuite, replies: Replies, run: JudgeRun) -> Verdicts:
        """``prefer`` for every pair under every principle; ``p_a`` is the mean over principles."""
        from tasks.eval.lm import LanguageModel, ModelSpec
        from tasks.feedback.judge import PrincipleJudge
        from tasks.train.post_stage import materialize

        spec = ModelSpec("judge", materialize(str(Path(self.path).expanduser())), chat=True)
        judge = PrincipleJudge(LanguageModel(spec, run.device, run.batch_size, run.max_length))
        return Verdicts(principle_records(judge, self.load_principles(), replies, self.tie_margin), {}, replies)


def principle_records(judge: PrincipleJudge, principles: Sequence[Principle], replies: Replies, tie_margin: float) -> list[dict[str, Any]]:
    """One record per prompt and pair of models from ``judge.prefer``, all in one batch."""
    pairs = list(_pairs(replies))
    rows = [(replies[a][i], replies[b][i], principle) for a, b, i in pairs for principle in principles]
    p = judge.prefer(
        [[{"role": "user", "content": first["prompt"]}] for first, _, _ in rows],
        [first["reply"] for first, _, _ in rows], [second["reply"] for _, second, _ in rows], [pr for _, _, pr in rows],
    )
    records = []
    for n, (a, b, i) in enumerate(pairs):
        p_a = mean(p[n * len(principles) : (n + 1) * len(principles)])
        score = 0.5 if abs(p_a - 0.5) <= tie_margin else float(p_a > 0.5)
        records.append({"id": replies[a][i]["id"], "a": a, "b": b, "score_a": score, "p_a": p_a})
    return records


def _reward_model_folder(value: Any) -> Any:
    """A bare string is a reward-model folder: ``judge: path`` as before principle judges existed."""
    return {"kind": "reward_model", "path": value} if isinstance(value, str) else value


JudgeConfig = Annotated[
    RewardModelJudge | PrincipleJudgeConfig, Field(discriminator="kind"), BeforeValidator(_reward_model_folder)
]


def arena_metrics(games: Sequence[Game], k: float, seed: int) -> dict[str, dict[str, float]]:
    """``elo`` and ``win_rate`` of every model that played."""
    ratings = elo_ratings(games, k=k, seed=seed) if games else {}
    wins = win_rates(games)
    return {model: {"elo": ratings[model], "win_rate": wins[model]} for model in ratings}


class PromptRow(Row):
    prompt: str = Field(..., min_length=1)


class PairwiseSuite(SuiteBase):
    """Replies are generated per model (``evaluate``) and judged across models (``tasks/eval/arena.py``)."""

    row_model = PromptRow
    kind: Literal["pairwise"] = "pairwise"
    max_new_tokens: int = Field(64, ge=1)
    judge: JudgeConfig | None = Field(None, description="this arena's judge; default: evaluate.judge, else the reward stage's model")
    min_human_votes: int = Field(20, ge=1, description="human votes on the current replies that replace the model judge")
    tie_margin: float = Field(0.0, ge=0, description="reward-model judges: reward differences up to this are ties")
    k_factor: float = Field(16.0, gt=0, description="Elo K: rating change per unexpected result")
    bootstrap_rounds: int = Field(1000, ge=10, description="resamples of the human votes for the Elo 95% interval")

    def evaluate(self, lm: LanguageModel, rows: list[PromptRow], settings: EvalSettings) -> SuiteOutput:
        replies = lm.generate([row.prompt for row in rows], chat=lm.spec.chat, max_new_tokens=self.max_new_tokens, seed=settings.seed)
        return SuiteOutput({}, [{"id": row.id, "prompt": row.prompt, "reply": reply} for row, [reply] in zip(rows, replies)])
