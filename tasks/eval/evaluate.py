"""``evaluate``: every model the run produced, plus baselines, through the same suites; the report card.

Models: an ``untrained`` model (the pretrain architecture and tokenizer with freshly seeded
weights: the floor every trained model must beat), the ``model/`` folders of the configured
``pretrain``, ``sft`` and ``align`` stages (``models`` narrows the list) and any local Hugging
Face checkpoints named under ``baselines``.
Each model is evaluated in its own Ray task (``num_cpus``/``num_gpus`` each, so a cluster spreads
them over GPUs); pairwise suites ("arenas") then have every pair of replies judged and rank the
models by Elo. Each arena's judge is people's votes from ``crucible rate`` when there are enough on
these replies, else the configured judge (a reward model or a principle judge), else the reward
stage's model, flagged when ``align`` optimises it (``tasks/eval/arena.py``). The votes' digest is
an input of the stage: new votes rerun it.

Upstream: ``evaluate`` takes ``pretrain``, ``sft``, ``reward`` and ``align`` as optional upstreams
when the config has them (a fine-tuning pipeline that starts at ``sft`` from an open-weight
checkpoint has no ``pretrain``, and so no ``untrained`` column either); the engine then hands
their manifests over like any other (retraining ``sft`` re-runs ``evaluate``).

Outputs: ``scores.json`` (model -> metric -> value), ``samples/<model>/<suite>.jsonl`` (every
item's reply, extraction, verdict), ``pairwise/<suite>.jsonl`` (the games and their judge's evidence), ``report_card.md`` (with a section per arena:
its judge, and the human Elo with bootstrap intervals when people voted)
and ``training_curves.png`` (loss / reward / KL of the upstream stages, from their MLflow runs).
Metrics ``eval.<model>.<suite>.<metric>`` go to the manifest and MLflow.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.digest import file_digest, folder_digest
from tasks.errors import ConfigError
from tasks.eval.arena import choose_judge, human_elo, human_verdicts, optimised_reward, tally
from tasks.eval.pairwise import JudgeConfig, JudgeRun, PairwiseSuite, PrincipleJudgeConfig, Replies, Verdicts, arena_metrics
from tasks.eval.preference import PreferenceSuite, implicit_reward
from tasks.eval.report import arena_section, fetch_histories, mlflow_name, previous_models, report_card, training_curves
from tasks.eval.safety import SafetySuite
from tasks.eval.sandbox import SandboxLimits
from tasks.eval.suite import EvalSettings, SuiteOutput
from tasks.eval.suites import SuiteConfig
from tasks.feedback.votes import VoteStore
from tasks.stage import DIGESTED, Manifest, Stage, StageContext, StageResult

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import ModelSpec


MODEL_STAGES = ("pretrain", "sft", "align")  # stages whose model/ is a causal LM to evaluate
UNTRAINED = "untrained"  # the column of the seeded, untrained pretrain architecture
OPTIONAL_UPSTREAM = ("pretrain", "sft", "reward", "align")
CURVE_STAGES = ("pretrain", "sft", "reward", "align")


class BaselineModel(BaseModel):
    """A checkpoint on local disk evaluated beside the pipeline's models."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="its column in the report card")
    path: str = Field(
        ..., description="local Hugging Face causal-LM folder (config.json, weights, tokenizer)", json_schema_extra=DIGESTED
    )
    chat: bool = Field(False, description="prompt it through its tokenizer's chat template")


class EvaluateConfig(BaseModel):
    """Which models, which suites, and how to run them."""

    model_config = ConfigDict(extra="forbid")

    suites: list[SuiteConfig] = Field(..., min_length=1, description="test sets, each with a `kind` (see tasks/eval/README.md)")
    models: list[Literal["pretrain", "sft", "align"]] | None = Field(
        None, description="pipeline models to evaluate; default: every one this config trains"
    )
    baselines: list[BaselineModel] = Field(default_factory=list)
    untrained: bool = Field(True, description="also evaluate the pretrain architecture with fresh (seeded) weights, as the floor")
    judge: JudgeConfig | None = Field(
        None, description="pairwise suites' judge (a suite's own `judge` wins): a reward-model folder, or "
        "{kind: principle, path, constitution, principles}; default: the reward stage's model"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    max_length: int | None = Field(None, ge=8, description="context window used; default: the model's")
    seed: int = 0
    sandbox: SandboxLimits = SandboxLimits()
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per model task")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per model task")

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluateConfig:
        for what, names in (("suite", [s.name for s in self.suites]), ("baseline", [b.name for b in self.baselines])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(repeated)}")
        clash = sorted({b.name for b in self.baselines} & {*MODEL_STAGES, UNTRAINED})
        if clash:
            raise ValueError(f"baseline names must differ from stage names: {', '.join(clash)}")
        return self


# ---------------------------------------------------------------------------------- planning


def _model_stages(cfg: EvaluateConfig, available: Any) -> list[str]:
    """The pipeline models to evaluate among the ``available`` stages, in chain order."""
    return [s for s in MODEL_STAGES if s in available and (cfg.models is None or s in cfg.models)]


def _folder_digest(path: str, field: str) -> str:
    """The content digest of a model folder (``tasks/digest.py``); not a model folder is a config error."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError("config", [(field, f"'{path}' is not a Hugging Face model folder (no config.json)")])
    return folder_digest(folder)


def _judge_digest(judge: JudgeConfig, field: str) -> dict[str, str]:
    """A judge's model folder and, for a principle judge, its constitution (whose principles must exist)."""
    parts = {"model": _folder_digest(judge.path, f"{field}.path")}
    if isinstance(judge, PrincipleJudgeConfig):
        judge.load_principles(field)
        parts["constitution"] = file_digest(Path(judge.constitution).expanduser())
    return parts


def inputs_digest(cfg: EvaluateConfig, pipeline: Any) -> str:
    """Suite files (validated here, before anything runs), baseline and judge folders, constitutions,
    and the pipeline's human votes when it has arenas (new votes rerun the stage)."""
    parts: dict[str, Any] = {}
    for suite in cfg.suites:
        suite.read_rows()
        parts[f"suite:{suite.name}"] = suite.digest()
    for i, baseline in enumerate(cfg.baselines):
        parts[f"baseline:{baseline.name}"] = _folder_digest(baseline.path, f"evaluate.baselines[{i}].path")
    arenas = [s for s in cfg.suites if isinstance(s, PairwiseSuite)]
    judges = {"evaluate.judge": cfg.judge, **{f"evaluate.suites[{s.name}].judge": s.judge for s in arenas}}
    for field, judge in judges.items():
        if judge is not None:
            parts[f"judge:{field}"] = _judge_digest(judge, field)
    if arenas:
        parts["votes"] = VoteStore.for_pipeline(pipeline.name).digest()
    optional = [s for s in OPTIONAL_UPSTREAM if pipeline.section(s) is not None]
    configured = [s for s in MODEL_STAGES if pipeline.section(s) is not None]
    missing = sorted(set(cfg.models or ()) - set(configured))
    if missing:
        raise ConfigError("config", [("evaluate.models", f"stage(s) {', '.join(missing)} not configured")])
    models = len(_model_stages(cfg, configured)) + len(cfg.baselines) + int(cfg.untrained and "pretrain" in configured)
    if arenas:
        unjudged = [s.name for s in arenas if s.judge is None and cfg.judge is None]
        if unjudged and "reward" not in optional:
            why = "need a judge: set evaluate.judge (a reward-model folder or a principle judge) or configure the reward stage"
            raise ConfigError("config", [("evaluate.suites", f"pairwise suite(s) {', '.join(unjudged)} {why}")])
        if models < 2:
            raise ConfigError("config", [("evaluate.suites", f"pairwise suites need two models or more, this config has {models}")])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------- ray tasks


def evaluate_model(spec: ModelSpec, suites: list[Any], rows: dict[str, list[Any]], cfg: EvaluateConfig) -> dict[str, SuiteOutput]:
    """Every suite on one model (runs as a Ray task)."""
    from tasks.eval.lm import LanguageModel, ModelSpec  # torch: loaded by the workers, not at config load
    from tasks.train.post_stage import materialize

    local = ModelSpec(spec.name, materialize(spec.path), spec.chat, spec.stage, spec.init_seed)
    lm = LanguageModel(local, cfg.device, cfg.batch_size, cfg.max_length)
    settings = EvalSettings(seed=cfg.seed, sandbox=cfg.sandbox)
    outputs = {}
    for suite in suites:  # one line per suite: generation-heavy suites take minutes on CPU
        started = time.monotonic()
        outputs[suite.name] = out = suite.evaluate(lm, rows[suite.name], settings)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in list(out.metrics.items())[:3])
        print(f"{spec.name} / {suite.name}: {len(rows[suite.name])} items in {time.monotonic() - started:.1f}s ({shown})", flush=True)
    return outputs


def judge_pairwise(judge: JudgeConfig, suite: PairwiseSuite, replies: Replies, run: JudgeRun) -> Verdicts:
    """A model judge's verdicts on one arena (runs as a Ray task: it loads a model)."""
    return judge.verdicts(suite, replies, run)


def _remote(cfg: EvaluateConfig, fn, *args):
    import ray

    return ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(fn).remote(*args)


# ---------------------------------------------------------------------------------- stage


def model_specs(cfg: EvaluateConfig, manifests: dict[str, Manifest]) -> list[ModelSpec]:
    """The untrained floor, pipeline models (``sft`` and ``align`` are chat models), then baselines: the card's columns."""
    from tasks.eval.lm import ModelSpec
    from tasks.train.post_stage import model_uri

    floor = cfg.untrained and "pretrain" in manifests
    specs = [ModelSpec(UNTRAINED, model_uri(manifests["pretrain"]), chat=False, stage=UNTRAINED, init_seed=cfg.seed)] if floor else []
    specs += [ModelSpec(stage, model_uri(manifests[stage]), chat=stage != "pretrain", stage=stage) for stage in _model_stages(cfg, manifests)]
    specs += [ModelSpec(b.name, str(Path(b.path).expanduser()), chat=b.chat) for b in cfg.baselines]
    return specs


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode()


def run(ctx: StageContext) -> StageResult:
    import ray

    cfg: EvaluateConfig = ctx.config
    manifests = dict(ctx.upstream)
    specs = model_specs(cfg, manifests)
    rows = {suite.name: suite.read_rows() for suite in cfg.suites}
    pending = {spec.name: _remote(cfg, evaluate_model, spec, cfg.suites, rows, cfg) for spec in specs}
    outputs: dict[str, dict[str, SuiteOutput]] = dict(zip(pending, ray.get(list(pending.values()))))

    scores: dict[str, dict[str, float]] = {
        spec.name: {f"{suite}/{metric}": value for suite, out in outputs[spec.name].items() for metric, value in out.metrics.items()}
        for spec in specs
    }
    arenas = _arenas(ctx, manifests, outputs, scores)
    _implicit_rewards(cfg, specs, outputs, scores)
    notes = _refusal_bands(cfg, specs, scores)
    for name, suites in outputs.items():
        for suite_name, out in suites.items():
            ctx.out.write_bytes_atomic(f"samples/{name}/{suite_name}.jsonl", _jsonl(out.samples))
    ctx.out.write_bytes_atomic("scores.json", json.dumps(scores, indent=2, sort_keys=True).encode())

    isolation = sorted({layer for suites in outputs.values() for out in suites.values() for s in out.samples for layer in s.get("isolation", [])})
    if isolation:
        notes.append(f"Code ran in the sandbox with: {', '.join(isolation)}.")
    card = report_card(scores, previous_models(specs)) + "".join("\n" + section for section in arenas)
    runs = {stage: manifests[stage].mlflow_run_id for stage in CURVE_STAGES if stage in manifests and manifests[stage].mlflow_run_id}
    card += _publish_curves(ctx, runs, notes)
    report = "## Report card\n\n" + card + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
    ctx.out.write_bytes_atomic("report_card.md", report.encode())
    ctx.log.log_text(report, "report_card.md")
    ctx.log.log_dict(scores, "scores.json")

    metrics = {mlflow_name(f"eval.{model}.{metric.replace('/', '.')}"): value for model, values in scores.items() for metric, value in values.items()}
    samples = sum(len(out.samples) for suites in outputs.values() for out in suites.values())
    return StageResult(rows=samples, counts={"models": len(specs), "suites": len(cfg.suites), "samples": samples}, metrics=metrics, report=report)


def _arenas(ctx: StageContext, manifests: dict[str, Manifest], outputs: dict[str, dict[str, SuiteOutput]], scores: dict[str, dict[str, float]]) -> list[str]:
    """Judge every pairwise suite (``tasks/eval/arena.py`` picks the judge); add Elo, win rates and
    human Elo to ``scores``; write the games. Returns the card's section per arena."""
    import ray

    from tasks.train.post_stage import model_uri

    cfg: EvaluateConfig = ctx.config
    reward_model = model_uri(manifests["reward"]) if "reward" in manifests else None
    rl_reward = optimised_reward(ctx.pipeline)
    store = VoteStore.for_pipeline(ctx.pipeline.name)
    run = JudgeRun(cfg.device, cfg.batch_size, cfg.max_length)
    sections = []
    for suite in (s for s in cfg.suites if isinstance(s, PairwiseSuite)):
        replies = {name: outputs[name][suite.name].samples for name in outputs}
        votes = tally(store.votes(suite.name), replies)
        judge = choose_judge(suite, cfg.judge, reward_model, votes, rl_reward)
        if judge.model is None:
            verdicts = human_verdicts(votes, replies)
        else:
            verdicts = ray.get(_remote(cfg, judge_pairwise, judge.model, suite, replies, run))
        human = human_elo(suite, votes, cfg.seed)
        for values in (verdicts.metrics, arena_metrics(verdicts.games(), suite.k_factor, cfg.seed), human.metrics() if human else {}):
            for name, metrics in values.items():
                scores[name].update({f"{suite.name}/{key}": value for key, value in metrics.items()})
        for name in outputs:
            outputs[name][suite.name].samples = verdicts.replies[name]
        ctx.out.write_bytes_atomic(f"pairwise/{suite.name}.jsonl", _jsonl(verdicts.records))
        sections.append(arena_section(suite.name, judge, len(verdicts.records), votes, human, suite.min_human_votes))
        if judge.warning:
            print(f"evaluate / {suite.name}: warning: {judge.warning}", flush=True)
    return sections


def _implicit_rewards(cfg: EvaluateConfig, specs: list[ModelSpec], outputs: dict[str, dict[str, SuiteOutput]], scores: dict[str, dict[str, float]]) -> None:
    """Each chain model's implicit reward on every preference suite, against the model before it."""
    previous = previous_models(specs)
    for suite in (s for s in cfg.suites if isinstance(s, PreferenceSuite)):
        for name, before in previous.items():
            if before is not None:
                values = implicit_reward(outputs[name][suite.name].samples, outputs[before][suite.name].samples)
                scores[name].update({f"{suite.name}/{metric}": value for metric, value in values.items()})


def _refusal_bands(cfg: EvaluateConfig, specs: list[ModelSpec], scores: dict[str, dict[str, float]]) -> list[str]:
    """``within_band`` for each chain model on every safety suite; a note for each model outside it."""
    notes = []
    for suite in (s for s in cfg.suites if isinstance(s, SafetySuite)):
        for name, before in previous_models(specs).items():
            if before is not None:
                inside = suite.within_band(scores[name], scores[before])
                scores[name][f"{suite.name}/within_band"] = float(inside)
                if not inside:
                    notes.append(f"`{name}` moved its `{suite.name}` refusal rates by more than {suite.band} from `{before}`.")
    return notes


def _publish_curves(ctx: StageContext, runs: dict[str, str], notes: list[str]) -> str:
    """Plot the upstream stages' training curves; store and log the image. Returns markdown for the card."""
    histories = fetch_histories(ctx.log.uri, runs)
    if not any(histories.values()):
        notes.append("No training curves: the upstream stages' MLflow runs have no loss, reward or KL history.")
        return ""
    local = Path(tempfile.mkdtemp(prefix="crucible-eval-"))
    image = local / "training_curves.png"
    training_curves(histories, image)
    ctx.out.write_bytes_atomic("training_curves.png", image.read_bytes())
    ctx.log.log_artifact(image)
    if ctx.log.flush():  # a buffered upload still needs the file
        shutil.rmtree(local, ignore_errors=True)
    return "\n![training curves](training_curves.png)\n"


STAGE = Stage(name="evaluate", upstream=(), version="3", run=run, inputs=inputs_digest, optional_upstream=OPTIONAL_UPSTREAM)
