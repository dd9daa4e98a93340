"""The report card (models as columns, metrics as rows, change from the previous stage), one section
per arena (its judge, and people's Elo when there are votes) and the training-curves plot of the
upstream stages (loss, reward, KL from their MLflow runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from tasks.eval.suites import higher_is_better

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.arena import ArenaJudge, HumanElo, VoteTally
    from tasks.eval.elo import Game
    from tasks.eval.lm import ModelSpec


# Which logged metrics each panel of the training-curves plot shows.
CURVE_PANELS: dict[str, re.Pattern[str]] = {
    "loss": re.compile(r"(^|/)loss$"),
    "reward": re.compile(r"reward"),
    "KL": re.compile(r"(^|[/_])kl($|[/_])", re.IGNORECASE),
}


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts (``pass@1`` -> ``pass_at_1``)."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


def previous_models(specs: Sequence[ModelSpec]) -> dict[str, str | None]:
    """Each pipeline model's predecessor in the chain (``pretrain`` -> ``untrained``, ``sft`` -> ``pretrain``); baselines have none."""
    previous: dict[str, str | None] = {}
    last: str | None = None
    for spec in specs:
        previous[spec.name] = last if spec.stage else None
        if spec.stage:
            last = spec.name
    return previous


def _value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def _cell(value: float | None, before: float | None) -> str:
    if value is None or before is None or math.isnan(value) or math.isnan(before):
        return _value(value)
    delta = value - before
    return f"{_value(value)} ({'+' if delta >= 0 else '−'}{_value(abs(delta))})"


def report_card(scores: dict[str, dict[str, float]], previous: dict[str, str | None]) -> str:
    """A markdown table: a column per model, a row per metric; pipeline models show their change
    from the previous stage in brackets; ↑/↓ marks whether higher or lower is better."""
    models = list(scores)
    metrics = sorted({m for values in scores.values() for m in values})
    header = "| metric | " + " | ".join(f"{m} (vs {previous[m]})" if previous.get(m) else m for m in models) + " |"
    lines = [header, "|---|" + "---:|" * len(models)]
    for metric in metrics:
        arrow = "↑" if higher_is_better(metric) else "↓"
        cells = [_cell(scores[m].get(metric), scores[previous[m]].get(metric) if previous.get(m) else None) for m in models]
        lines.append(f"| {metric} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def arena_section(suite: str, judge: ArenaJudge, games: int, votes: VoteTally, human: HumanElo | None, needed: int) -> str:
    """Markdown for one arena: who judged it (and a warning when that judge is the RL reward), stale
    votes, and the human Elo table when people voted on the current replies."""
    lines = [f"### Arena `{suite}`", "", f"Judge: {judge.description} ({games} games)."]
    if judge.warning:
        lines += ["", f"> **Warning:** {judge.warning}"]
    if votes.stale:
        lines += ["", f"{len(votes.stale)} stale votes (on replies that have changed since) are not counted."]
    if human is not None:
        short = "" if len(votes.current) >= needed else f"; {needed} make them this arena's judge"
        lines += ["", f"Human Elo ({votes.describe()}{short}), with bootstrap 95% intervals:", "", human_elo_table(human)]
    return "\n".join(lines) + "\n"


def human_elo_table(human: HumanElo) -> str:
    """Models by human Elo: the 95% interval, games played, and the share of points won against each other model."""
    models = sorted(human.ratings, key=lambda m: -human.ratings[m][0])
    points, played = _pair_scores(human.games)
    lines = ["| model | human Elo | 95% interval | games | " + " | ".join(f"vs {m}" for m in models) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(models)]
    for model in models:
        rating, low, high = human.ratings[model]
        games = sum(n for (a, _), n in played.items() if a == model)
        cells = [f"{points[model, other] / played[model, other]:.2f} of {played[model, other]}" if played.get((model, other)) else "–"
                 for other in models]
        lines.append(f"| {model} | {rating:.1f} | {low:.1f} – {high:.1f} | {games} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pair_scores(games: Sequence[Game]) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
    """(points of x against y, games of x against y) for every ordered pair that met; a tie is half a point each."""
    points: dict[tuple[str, str], float] = {}
    played: dict[tuple[str, str], int] = {}
    for game in games:
        for x, y, score in ((game.a, game.b, game.score_a), (game.b, game.a, 1.0 - game.score_a)):
            points[x, y] = points.get((x, y), 0.0) + score
            played[x, y] = played.get((x, y), 0) + 1
    return points, played


def fetch_histories(uri: str, runs: dict[str, str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """stage -> metric -> [(step, value)] for the metrics any panel shows; fail-soft (empty on outage)."""
    from mlflow import MlflowClient

    from tasks.tracking import resolve_run

    histories: dict[str, dict[str, list[tuple[int, float]]]] = {}
    try:
        client = MlflowClient(tracking_uri=uri)
        for stage, run_id in runs.items():
            run_id = resolve_run(uri, run_id)  # a run created after an outage
            keys = [k for k in client.get_run(run_id).data.metrics if any(p.search(k) for p in CURVE_PANELS.values())]
            histories[stage] = {
                key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in sorted(keys)
            }
    except Exception as exc:  # noqa: BLE001 - a tracking outage costs the plot, not the stage
        warnings.warn(f"MLflow unreachable at {uri}: no training curves ({exc})", RuntimeWarning)
    return histories


def training_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """One panel per kind of curve (loss, reward, KL), every stage's series in it, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name, pattern in CURVE_PANELS.items() if any(pattern.search(k) for h in histories.values() for k in h)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for stage, series in histories.items():
            for key, points in series.items():
                if CURVE_PANELS[panel].search(key) and points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, label=f"{stage}: {key}", marker="." if len(points) < 20 else None)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
