"""Who judges each arena (pairwise suite), and the human Elo of people's votes.

An arena's Elo is only as honest as its judge. The reward model that PPO/GRPO optimise is the
worst judge of the policy trained on it: a policy that found the reward model's blind spots
rates itself up. So each arena takes, in this order:

1. **human votes** (``crucible rate``) when at least ``min_human_votes`` of them are on the
   replies this run generated: same suite, prompt id, models and reply texts. Votes on replies
   that have changed since (a retrained model answers differently) are *stale*: counted and
   reported, never scored;
2. else the **configured judge** (the suite's ``judge``, else ``evaluate.judge``): a reward-model
   folder, or a principle judge (any causal LM + a constitution);
3. else the **reward stage's model**, with a warning on the card when ``align`` optimises that
   very model (``method: ppo|grpo`` with ``reward: model``). It stays a warning, not a refusal:
   the reward model's view is still informative for DPO and SFT models, and the card says plainly
   whom it favours.

Whatever the judge, matching human votes also give every arena a human Elo with a bootstrap 95%
interval (``tasks/eval/elo.py: bootstrap_elo``) and win rates per pair of models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.errors import StageError
from tasks.eval.elo import Game, bootstrap_elo
from tasks.eval.pairwise import JudgeConfig, PairwiseSuite, Replies, RewardModelJudge, Verdicts
from tasks.feedback.votes import Vote, vote_games

RL_METHODS = ("grpo", "ppo")


@dataclass(frozen=True)
class VoteTally:
    """One arena's votes: those on this run's replies, and the stale ones."""

    current: list[Vote]
    stale: list[Vote]

    def describe(self) -> str:
        raters = len({v.rater for v in self.current})
        return f"{len(self.current)} votes by {raters} rater{'s' if raters != 1 else ''}"


def tally(votes: list[Vote], replies: Replies) -> VoteTally:
    """Split an arena's votes by whether the prompt and both replies still read as the rater saw them."""
    now = {(model, s["id"], s["prompt"], s["reply"]) for model, samples in replies.items() for s in samples}
    current, stale = [], []
    for vote in votes:
        p = vote.pair
        shown = {(p.model_a, p.prompt_id, p.prompt, p.reply_a), (p.model_b, p.prompt_id, p.prompt, p.reply_b)}
        (current if shown <= now else stale).append(vote)
    return VoteTally(current, stale)


@dataclass(frozen=True)
class ArenaJudge:
    """An arena's judge: the model judge to run (None: the human votes decide) and what the card says."""

    model: JudgeConfig | None
    description: str
    warning: str | None = None


def optimised_reward(pipeline: Any) -> bool:
    """Whether ``align`` trains its policy against the reward stage's model."""
    align = pipeline.section("align")
    return align is not None and align.method in RL_METHODS and align.reward == "model"


def choose_judge(
    suite: PairwiseSuite, default: JudgeConfig | None, reward_model: str | None, votes: VoteTally, rl_reward: bool
) -> ArenaJudge:
    """Human votes when there are enough, else the configured judge, else the reward stage's model.

    ``reward_model`` is the reward stage's model (None without one); ``rl_reward`` whether
    ``align`` optimises it (``optimised_reward``).
    """
    if len(votes.current) >= suite.min_human_votes:
        return ArenaJudge(None, f"human votes: {votes.describe()}")
    configured = suite.judge or default
    if configured is not None:
        return ArenaJudge(configured, configured.describe())
    if reward_model is None:
        raise StageError(f"pairwise suite '{suite.name}' has no judge: set a judge or configure the reward stage")
    warning = (
        "this arena is judged by the reward model that `align` optimises (PPO/GRPO with `reward: model`): a policy "
        "that games that reward rates itself up here. Configure a principle judge (`judge: {kind: principle, ...}`) "
        "or collect human votes (`crucible rate`)."
        if rl_reward
        else None
    )
    return ArenaJudge(RewardModelJudge(path=reward_model), f"the reward stage's model `{reward_model}`", warning)


def human_verdicts(votes: VoteTally, replies: Replies) -> Verdicts:
    """The current votes as an arena's verdict records: one game per vote."""
    records = [
        {"id": v.pair.prompt_id, "a": g.a, "b": g.b, "score_a": g.score_a, "rater": v.rater, "winner": v.winner}
        for v, g in zip(votes.current, vote_games(votes.current))
    ]
    return Verdicts(records, {}, replies)


@dataclass(frozen=True)
class HumanElo:
    """People's verdict on an arena: each model's Elo and 95% interval, and the games behind them."""

    ratings: dict[str, tuple[float, float, float]]
    games: list[Game]

    def metrics(self) -> dict[str, dict[str, float]]:
        """``human_elo`` and its interval's ``human_elo_low`` / ``human_elo_high`` per model."""
        return {model: {"human_elo": r, "human_elo_low": low, "human_elo_high": high} for model, (r, low, high) in self.ratings.items()}


def human_elo(suite: PairwiseSuite, votes: VoteTally, seed: int) -> HumanElo | None:
    """Elo with bootstrap intervals from the current votes; None without any."""
    if not votes.current:
        return None
    games = vote_games(votes.current)
    return HumanElo(bootstrap_elo(games, rounds=suite.bootstrap_rounds, seed=seed, k=suite.k_factor), games)
