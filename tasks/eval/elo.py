"""Elo ratings from pairwise games, as in chatbot arenas.

A game is (model a, model b, score of a: 1 win, 0.5 tie, 0 loss). Sequential Elo depends on
the order of games, so ``elo_ratings`` averages the final ratings over shuffled orders: the
result depends on the games only (and the seed). Ratings are zero-sum around ``initial``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Game:
    a: str
    b: str
    score_a: float  # 1 = a won, 0.5 = tie, 0 = b won


def expected_score(rating_a: float, rating_b: float, scale: float = 400.0) -> float:
    """Chance that a beats b under the Elo model: ``1 / (1 + 10^((Rb - Ra) / scale))``."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / scale))


def elo_update(rating_a: float, rating_b: float, score_a: float, k: float = 16.0) -> tuple[float, float]:
    """Both ratings after one game: each moves by ``k`` times (actual - expected) score."""
    delta = k * (score_a - expected_score(rating_a, rating_b))
    return rating_a + delta, rating_b - delta


def elo_ratings(
    games: Sequence[Game], k: float = 16.0, initial: float = 1000.0, orders: int = 100, seed: int = 0
) -> dict[str, float]:
    """Mean final rating of every player over ``orders`` random orderings of ``games``."""
    players = sorted({g.a for g in games} | {g.b for g in games})
    totals = dict.fromkeys(players, 0.0)
    rng = random.Random(seed)
    order = list(games)
    for _ in range(orders):
        rng.shuffle(order)
        ratings = dict.fromkeys(players, initial)
        for game in order:
            ratings[game.a], ratings[game.b] = elo_update(ratings[game.a], ratings[game.b], game.score_a, k)
        for player in players:
            totals[player] += ratings[player]
    return {player: totals[player] / orders for player in players}


def win_rates(games: Iterable[Game]) -> dict[str, float]:
    """Each player's mean score over the games it played (ties count one half)."""
    points: dict[str, float] = {}
    played: dict[str, int] = {}
    for game in games:
        for player, score in ((game.a, game.score_a), (game.b, 1.0 - game.score_a)):
            points[player] = points.get(player, 0.0) + score
            played[player] = played.get(player, 0) + 1
    return {player: points[player] / played[player] for player in sorted(points)}


def bootstrap_elo(
    games: Sequence[Game], rounds: int = 100, seed: int = 0, k: float = 16.0, initial: float = 1000.0, orders: int = 10
) -> dict[str, tuple[float, float, float]]:
    """Each player's rating with a 95% interval: ``(rating, 2.5th, 97.5th percentile)``.

    The rating is ``elo_ratings`` of all the games; the interval comes from ``rounds`` resamples
    of the games with replacement (the spread a different draw of the same comparisons would
    give), each rated over ``orders`` shuffled orders: fewer than the point rating's, since the
    resampling already varies the order and a live report page recomputes this on every view.
    A player missing from a resample is left out of that round's percentiles.
    """
    if rounds < 2:
        raise ValueError(f"bootstrap_elo: rounds must be at least 2, got {rounds}")
    ratings = elo_ratings(games, k=k, initial=initial, seed=seed)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {player: [] for player in ratings}
    for round_ in range(rounds):
        resample = rng.choices(games, k=len(games))
        for player, rating in elo_ratings(resample, k=k, initial=initial, orders=orders, seed=seed + round_).items():
            samples[player].append(rating)
    intervals = {}
    for player, rating in ratings.items():
        values = samples[player] if len(samples[player]) >= 2 else [rating, rating]
        cuts = statistics.quantiles(values, n=40, method="inclusive")  # 39 cuts: the first is 2.5%, the last 97.5%
        intervals[player] = (rating, cuts[0], cuts[-1])
    return intervals
