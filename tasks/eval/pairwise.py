"""Pairwise comparison of checkpoints on held-out prompts, judged by the reward model, as Elo.

Row format (JSONL): ``{"prompt": str, "id": str?}``.

Every model answers every prompt (greedy, through its chat template if it is a chat model); the
reward model scores each reply; for every prompt and every pair of models the higher-scored
reply wins (a tie within ``tie_margin``). Metrics per model: ``elo`` (mean over shuffled game
orders, ``tasks/eval/elo.py``), ``win_rate`` and ``reward`` (mean reward-model score).
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tasks.eval.elo import Game, elo_ratings, win_rates
from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput, mean

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel, RewardJudge



class PromptRow(Row):
    prompt: str = Field(..., min_length=1)


class PairwiseSuite(SuiteBase):
    """Replies are generated per model (``evaluate``) and judged across models (``judge``)."""

    row_model = PromptRow
    kind: Literal["pairwise"] = "pairwise"
    max_new_tokens: int = Field(64, ge=1)
    tie_margin: float = Field(0.0, ge=0, description="reward differences up to this are ties")
    k_factor: float = Field(16.0, gt=0, description="Elo K: rating change per unexpected result")

    def evaluate(self, lm: LanguageModel, rows: list[PromptRow], settings: EvalSettings) -> SuiteOutput:
        replies = lm.generate([row.prompt for row in rows], chat=lm.spec.chat, max_new_tokens=self.max_new_tokens, seed=settings.seed)
        return SuiteOutput({}, [{"id": row.id, "prompt": row.prompt, "reply": reply} for row, [reply] in zip(rows, replies)])

    def judge(self, judge: RewardJudge, replies: dict[str, list[dict]], settings: EvalSettings) -> tuple[dict[str, dict[str, float]], list[Game]]:
        """Metrics per model and the games, from each model's ``evaluate`` samples."""
        rewards = {}
        for model, samples in replies.items():
            rewards[model] = judge.score([s["prompt"] for s in samples], [s["reply"] for s in samples])
            for sample, reward in zip(samples, rewards[model]):
                sample["reward"] = reward
        games = []
        for a, b in combinations(sorted(rewards), 2):
            for ra, rb in zip(rewards[a], rewards[b]):
                games.append(Game(a, b, 0.5 if abs(ra - rb) <= self.tie_margin else float(ra > rb)))
        ratings = elo_ratings(games, k=self.k_factor, seed=settings.seed) if games else {}
        wins = win_rates(games)
        metrics = {
            model: {"reward": mean(rewards[model]), **({"elo": ratings[model], "win_rate": wins[model]} if model in ratings else {})}
            for model in rewards
        }
        return metrics, games
