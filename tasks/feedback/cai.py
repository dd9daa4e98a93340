"""``feedback``: preference and revision data from the model itself, judged against a constitution.

Constitutional AI (Bai et al., 2022) in one Ray job after ``sft``:

- **Supervised phase (SL-CAI).** For every prompt the policy (the SFT model, or ``policy``)
  samples a reply, critiques it under a principle drawn at random, and revises it; ``revisions``
  rounds. ``revisions.jsonl`` holds chat rows (prompt -> last revision) that ``sft`` or ``align``
  can train on; ``audit/supervised.jsonl`` every reply, principle, critique and revision.
- **Preference phase (RL-CAI).** Two sampled replies per prompt; the judge (the policy unless
  ``judge`` names another model; loaded once when they are the same) picks the better one under
  a drawn principle from the log-probabilities of the labels ``(A)``/``(B)``, asked in both
  orders (``tasks/feedback/judge.py``). ``preferences.jsonl``: ``prompt``, ``chosen``,
  ``rejected``, ``principle``, ``judge_confidence``; pairs under ``min_confidence``, identical
  or empty replies are dropped, counted, and kept in ``audit/preferences.jsonl`` with the reason.

``reward`` and ``align`` read the outputs as data sources (``{stage: feedback, split:
preferences}``), so their fingerprints chain through this stage. Pairs with a known answer
(``agreement``) measure the judge: ``judge/agreement`` is the share whose chosen reply it prefers.

Generation runs on ``actors`` Ray actors (Ray Data ``map_batches``), each holding the model(s)
once; the driver prints a progress line as batches finish.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.data.chat_data import ChatSource, Loaded, load_examples, write_quarantine
from tasks.digest import file_digest, folder_digest
from tasks.errors import ConfigError
from tasks.feedback.constitution import Constitution, load_constitution
from tasks.feedback.judge import confidence
from tasks.stage import DIGESTED, Stage, StageContext, StageResult

QUARANTINE_FILE = "quarantine/quarantine.parquet"
PROGRESS_EVERY_S = 10.0


class FeedbackConfig(BaseModel):
    """Where prompts and principles come from, which models answer and judge, how much to keep."""

    model_config = ConfigDict(extra="forbid")

    constitution: str = Field(
        ..., description="YAML file of principles (critique, revision, comparison)", json_schema_extra=DIGESTED
    )
    prompts: list[ChatSource] = Field(..., min_length=1, description="prompt rows (`{\"prompt\": …}`): red-team and ordinary requests")
    agreement: list[ChatSource] = Field(
        default_factory=list, description="preference pairs whose right answer is known: the judge's agreement rate on them"
    )
    policy: str | None = Field(
        None, description="local Hugging Face folder that answers, critiques and revises; default: the sft stage's model",
        json_schema_extra=DIGESTED,
    )
    judge: str | None = Field(
        None, description="local Hugging Face folder that picks the better reply; default: the policy", json_schema_extra=DIGESTED,
    )
    revisions: int = Field(1, ge=0, description="critique-and-revise rounds per prompt (0: no supervised phase)")
    preferences: bool = Field(True, description="run the preference phase (two replies per prompt, judged)")
    min_confidence: float = Field(0.6, ge=0.5, le=1.0, description="drop pairs the judge prefers with less probability than this")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the replies; critiques and revisions are greedy")
    top_p: float = Field(0.95, gt=0, le=1)
    actors: int = Field(2, ge=1, description="Ray actors, each holding the model(s) once")
    batch_size: int = Field(16, ge=1, description="prompts per batch (and sequences per forward pass)")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per actor")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per actor")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _some_phase(self) -> FeedbackConfig:
        if self.revisions == 0 and not self.preferences:
            raise ValueError("nothing to do: set revisions >= 1 or preferences: true")
        return self


# ---------------------------------------------------------------------------------- planning


def _model_folder(path: str, field: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError("config", [(field, f"'{path}' is not a Hugging Face model folder (no config.json)")])
    return folder


def inputs_digest(cfg: FeedbackConfig, _pipeline: Any) -> str:
    """The constitution (validated here, before anything runs), the prompt files and any model folders, by content."""
    from tasks.train.post_config import sources_digest

    load_constitution(cfg.constitution, "feedback.constitution")
    parts = {"constitution": file_digest(Path(cfg.constitution).expanduser())}
    problems: list[tuple[str, str]] = []
    parts["prompts"] = sources_digest(cfg.prompts, "feedback.prompts", problems)
    parts["agreement"] = sources_digest(cfg.agreement, "feedback.agreement", problems)
    for field in ("policy", "judge"):
        value = getattr(cfg, field)
        if value is not None:
            try:
                parts[field] = folder_digest(_model_folder(value, f"feedback.{field}"))
            except ConfigError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ConfigError("config", problems)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def feedback_needs(cfg: FeedbackConfig) -> tuple[str, ...]:
    return () if cfg.policy else ("sft",)


# ---------------------------------------------------------------------------------- work items


def _draw(constitution: Constitution, seed: int, key: str, what: str) -> str:
    """A principle drawn at random, stable for (seed, row, purpose) whatever the batching."""
    rng = random.Random(f"{seed}\0{key}\0{what}")
    return rng.choice(constitution.principles).name


def work_items(cfg: FeedbackConfig, constitution: Constitution, prompts: Loaded, known: Loaded) -> list[dict[str, Any]]:
    """One JSON row per prompt and per known pair, with its drawn principles and a sampling seed."""
    items = []
    for index, example in enumerate(prompts.rows):
        items.append({
            "index": index, "task": "prompt", "id": example.id, "prompt": example.value.prompt,
            "critique_principles": [_draw(constitution, cfg.seed, example.id, f"critique{r}") for r in range(cfg.revisions)],
            "principle": _draw(constitution, cfg.seed, example.id, "preference"),
            "seed": cfg.seed * 1_000_003 + index,
        })
    for index, example in enumerate(known.rows, start=len(items)):
        pair = example.value
        items.append({
            "index": index, "task": "agreement", "id": example.id, "prompt": pair.prompt,
            "chosen": pair.chosen[0]["content"], "rejected": pair.rejected[0]["content"],
            "principle": _draw(constitution, cfg.seed, example.id, "preference"), "seed": index,
        })
    return items


def generate_on_ray(cfg: FeedbackConfig, policy: str, judge: str, constitution: Constitution, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every item through the actors, with a progress line; back in input order."""
    import pyarrow as pa
    import ray

    from tasks.feedback.worker import FeedbackWorker, Generation

    generation = Generation(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.revisions, cfg.preferences, cfg.device, cfg.batch_size)
    rows = pa.table({"row": [json.dumps(item, ensure_ascii=False) for item in items]})
    blocks = [rows.slice(start, cfg.batch_size) for start in range(0, len(rows), cfg.batch_size)]  # one per batch: every actor gets work
    results = ray.data.from_arrow(blocks).map_batches(
        FeedbackWorker, fn_constructor_args=(policy, judge, constitution, generation), batch_size=cfg.batch_size,
        batch_format="pyarrow", concurrency=cfg.actors, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
    )
    done: list[dict[str, Any]] = []
    started = last = time.monotonic()
    for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += [json.loads(r) for r in batch.column("row").to_pylist()]
        if time.monotonic() - last >= PROGRESS_EVERY_S or len(done) == len(items):
            last = time.monotonic()
            print(f"feedback: {len(done)}/{len(items)} rows in {last - started:.0f}s", flush=True)
    return sorted(done, key=lambda r: r["index"])


# ---------------------------------------------------------------------------------- outputs


def supervised_rows(done: list[dict[str, Any]], counts: dict[str, int]) -> list[dict[str, Any]]:
    """Chat rows: the prompt and its last revision (an empty revision is dropped and counted)."""
    out = []
    for row in done:
        if row["task"] != "prompt" or not row.get("rounds"):
            continue
        final = row["rounds"][-1]["revision"].strip()
        if not final:
            counts["empty_revisions"] += 1
            continue
        out.append({"id": row["id"], "messages": [*row["prompt"], {"role": "assistant", "content": final}],
                    "principle": row["rounds"][-1]["principle"]})
    return out


def preference_rows(done: list[dict[str, Any]], min_confidence: float, counts: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """(kept pairs, the audit of every pair with its verdict and why it was dropped)."""
    kept, audit = [], []
    for row in done:
        if row["task"] != "prompt" or "replies" not in row:
            continue
        first, second = (r.strip() for r in row["replies"])
        p, reason = row["p_first"], None
        if not first or not second:
            reason = "empty_replies"
        elif first == second:
            reason = "identical_replies"
        elif confidence(p) < min_confidence:
            reason = "low_confidence"
        chosen, rejected = (first, second) if p >= 0.5 else (second, first)
        audit.append({"id": row["id"], "prompt": row["prompt"], "replies": [first, second], "principle": row["principle"],
                      "p_first": p, "judge_confidence": confidence(p), "dropped": reason})
        if reason:
            counts[reason] += 1
            continue
        kept.append({"id": row["id"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                     "principle": row["principle"], "judge_confidence": confidence(p)})
    return kept, audit


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def run(ctx: StageContext) -> StageResult:
    from tasks.train.post_stage import model_uri

    cfg: FeedbackConfig = ctx.config
    constitution = load_constitution(cfg.constitution, "feedback.constitution")
    policy = str(_model_folder(cfg.policy, "feedback.policy")) if cfg.policy else model_uri(ctx.upstream["sft"])
    judge = str(_model_folder(cfg.judge, "feedback.judge")) if cfg.judge else policy
    prompts = load_examples(cfg.prompts, "prompt", "feedback.prompts")
    known = load_examples(cfg.agreement, "preference", "feedback.agreement") if cfg.agreement else Loaded()
    write_quarantine(ctx.out.fs, ctx.out.path(QUARANTINE_FILE), prompts.quarantine + known.quarantine)
    if not prompts.rows:
        raise ConfigError("config", [("feedback.prompts", f"no usable prompt rows ({len(prompts.quarantine)} quarantined)")])

    done = generate_on_ray(cfg, policy, judge, constitution, work_items(cfg, constitution, prompts, known))
    counts = {"prompts": len(prompts.rows), "quarantined": len(prompts.quarantine) + len(known.quarantine),
              "empty_revisions": 0, "low_confidence": 0, "identical_replies": 0, "empty_replies": 0}
    revisions = supervised_rows(done, counts)
    pairs, audit = preference_rows(done, cfg.min_confidence, counts)
    counts.update(revisions=len(revisions), pairs=len(pairs))
    ctx.out.write_bytes_atomic("revisions.jsonl", _jsonl(revisions))
    ctx.out.write_bytes_atomic("preferences.jsonl", _jsonl(pairs))
    supervised_audit = [{k: r[k] for k in ("id", "prompt", "response", "rounds")} for r in done if r.get("rounds") is not None]
    ctx.out.write_bytes_atomic("audit/supervised.jsonl", _jsonl(supervised_audit))
    ctx.out.write_bytes_atomic("audit/preferences.jsonl", _jsonl(audit))

    metrics: dict[str, float] = {}
    if audit:
        metrics["judge/mean_confidence"] = sum(a["judge_confidence"] for a in audit) / len(audit)
        metrics["pairs/kept_fraction"] = len(pairs) / len(audit)
    verdicts = [r["p_chosen"] for r in done if r["task"] == "agreement"]
    if verdicts:
        metrics["judge/agreement"] = sum(p > 0.5 for p in verdicts) / len(verdicts)
        metrics["judge/p_chosen"] = sum(verdicts) / len(verdicts)
        ctx.out.write_bytes_atomic("audit/agreement.jsonl", _jsonl(
            [{"id": r["id"], "principle": r["principle"], "p_chosen": r["p_chosen"]} for r in done if r["task"] == "agreement"]))
    ctx.log.log_metrics(metrics)
    report = _report(cfg, policy, judge, counts, metrics, revisions, pairs, len(verdicts))
    return StageResult(rows=len(revisions) + len(pairs), counts=counts, metrics=metrics, report=report)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:160]


def _report(cfg: FeedbackConfig, policy: str, judge: str, counts: dict[str, int], metrics: dict[str, float],
            revisions: list[dict], pairs: list[dict], known: int) -> str:
    lines = [f"Constitutional AI feedback on **{counts['prompts']}** prompts; policy `{policy}`, "
             f"judge {'the policy' if judge == policy else f'`{judge}`'}."]
    if cfg.revisions:
        lines.append(f"\n**{counts['revisions']}** revised replies after {cfg.revisions} critique-revision round(s) "
                     f"({counts['empty_revisions']} empty revisions dropped).")
    if cfg.preferences:
        dropped = counts["low_confidence"] + counts["identical_replies"] + counts["empty_replies"]
        lines.append(f"\n**{counts['pairs']}** AI-labelled pairs kept, {dropped} dropped: {counts['low_confidence']} under "
                     f"confidence {cfg.min_confidence}, {counts['identical_replies']} identical, {counts['empty_replies']} empty.")
        if not counts["pairs"]:
            lines.append(f"\n**No pair kept**: the judge was never {cfg.min_confidence:.0%} sure; a stage reading "
                         "`preferences` has nothing to learn from. Lower `min_confidence` or set a stronger `judge`.")
    if "judge/agreement" in metrics:
        lines.append(f"\nJudge agreement with {known} known preferences (both orders): **{metrics['judge/agreement']:.3f}**.")
    if revisions:
        lines.append("\n| prompt | revision |\n|---|---|")
        lines += [f"| {_cell(r['messages'][-2]['content'])} | {_cell(r['messages'][-1]['content'])} |" for r in revisions[:5]]
    if pairs:
        lines.append("\n| prompt | chosen | rejected | principle | confidence |\n|---|---|---|---|---:|")
        lines += [f"| {_cell(p['prompt'][-1]['content'])} | {_cell(p['chosen'])} | {_cell(p['rejected'])} | {p['principle']} | "
                  f"{p['judge_confidence']:.2f} |" for p in pairs[:5]]
    return "\n".join(lines) + "\n"


STAGE = Stage(name="feedback", upstream=("sft",), version="1", run=run, inputs=inputs_digest, needs=feedback_needs)
