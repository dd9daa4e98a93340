"""The ``crucible`` command: run the pipeline, report its state, trace a document, list stages, write demo data."""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import flows  # noqa: F401  (embedded defaults before Prefect is imported)
from tasks.config import load_config
from tasks.errors import CrucibleError
from tasks.registry import STAGE_ORDER, STAGES
from tasks.store import join_uri, read_text


def status_report(config_path: str) -> dict:
    """The stable ``crucible status --json`` document (see the README)."""
    from tasks.engine import plan

    config = load_config(config_path)
    stages = []
    for name, planned in plan(config).items():
        manifest = planned.manifest()
        stages.append(
            {
                "stage": name,
                "status": "done" if manifest else "missing",
                "fingerprint": planned.fingerprint,
                "path": planned.out.uri,
                "rows": manifest.rows if manifest else None,
                "tokens": manifest.tokens if manifest else None,
                "finished_at": manifest.finished_at.isoformat() if manifest else None,
                "mlflow_run_id": manifest.mlflow_run_id if manifest else None,
            }
        )
    return {"config": str(config_path), "name": config.name, "store": config.store_uri(), "stages": stages}


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.engine import plan, run_pipeline, select_stages

    config = load_config(args.config)
    selected = select_stages(config, args.from_stage, args.until_stage)
    planned = plan(config)  # every config and input error surfaces here, before Prefect or Ray start
    started = time.monotonic()
    if args.from_stage or args.force or not all(planned[s].manifest() for s in selected):
        from flows.pipeline import pipeline

        outcomes = pipeline(config=config, from_stage=args.from_stage, until_stage=args.until_stage, force=args.force or None)
    else:  # nothing to run: the MLflow tree records the cached run; no Prefect server is started for it
        print(f"Every selected stage of '{config.name}' is complete: nothing to run (Prefect not started).")
        outcomes = run_pipeline(config, until_stage=args.until_stage, planned=planned)
    ran = [o.stage for o in outcomes if o.state == "ran"]
    cached = [o.stage for o in outcomes if o.state == "cached"]
    print(f"\nPipeline '{config.name}' finished in {time.monotonic() - started:.1f}s: "
          f"ran {len(ran)} ({', '.join(ran) or '-'}), cached {len(cached)} ({', '.join(cached) or '-'})")
    for o in outcomes:
        size = f"{o.manifest.rows} rows" if o.manifest.rows is not None else ""
        if o.manifest.tokens is not None:
            size += f"{', ' if size else ''}{o.manifest.tokens} tokens"
        print(f"  {o.stage:<10} {o.state:<7} {size:<28} {o.manifest.path}")
    evaluated = [o for o in outcomes if o.stage == "evaluate"]
    if evaluated:  # the run ends on what it was for: how the models compare (ran or cached)
        print("\n" + read_text(join_uri(evaluated[0].manifest.path, "report_card.md")))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    report = status_report(args.config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['name']}  (store: {report['store']})")
    for s in report["stages"]:
        size = f"{s['rows']} rows" if s["rows"] is not None else ""
        print(f"  {s['stage']:<10} {s['status']:<8} {s['fingerprint']}  {size:<14} {s['path']}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """One document's lineage (``tasks/trace.py``): each stage's verdict, then where its tokens lie
    and which ``pretrain`` steps read them."""
    from tasks.trace import trace_document

    trace = trace_document(load_config(args.config), args.config, args.doc_id)
    print(trace.model_dump_json(indent=2) if args.json else trace.text())
    return 0


def cmd_stages(_args: argparse.Namespace) -> int:
    for name in STAGE_ORDER:
        stage = STAGES.get(name)
        if stage is None:
            print(f"  {name:<10} (not implemented yet)")
        else:
            print(f"  {name:<10} upstream: {', '.join(stage.upstream) or '-':<18} code version {stage.version}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the demo sets (corpus, chat and preference data, evaluation suites).

    Files whose bytes are unchanged are left alone. Fingerprints follow content, so a rewrite would
    change none, but an untouched file keeps its cached digest (``tasks/digest.py``): a second
    ``make demo`` reads nothing again to plan.
    """
    from tasks.data.demo_chat import write_demo_chat
    from tasks.data.demo_corpus import write_demo_corpus
    from tasks.eval.demo_suites import write_demo_suites

    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        root = Path(scratch)
        fresh = {
            **write_demo_corpus(root),
            **{f"chat/{k}": v for k, v in write_demo_chat(root / "chat").items()},
            **{f"eval/{k}": v for k, v in write_demo_suites(root / "eval").items()},
        }
        for name, path in fresh.items():
            final = target / path.relative_to(root)
            final.parent.mkdir(parents=True, exist_ok=True)
            changed = not final.exists() or not filecmp.cmp(path, final, shallow=False)
            if changed:
                shutil.move(path, final)
            print(f"  {name:<24} {final}  ({'written' if changed else 'unchanged'})")
    _copy_demo_checkpoint(target / "checkpoint")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    """Serve the rating page, add a rater, or export the votes as preference data (``tasks/feedback/rating_app.py``)."""
    from tasks.feedback.rating_app import export_preferences, rater_link, serve
    from tasks.feedback.rating_source import RatingSource
    from tasks.feedback.votes import VoteStore

    config = load_config(args.config)
    store = VoteStore.for_pipeline(config.name)
    if args.add_rater:
        try:
            token = store.add_rater(args.add_rater)
        except ValueError as exc:
            raise CrucibleError(f"--add-rater: {exc}") from None
        print(f"Link for {args.add_rater} (keep it private; adding the name again replaces it):\n{rater_link(token, args.host, args.port)}")
    elif args.export:
        written, skipped = export_preferences(store, Path(args.export))
        print(f"{args.export}: {written} preference rows; {skipped} voted pairs skipped (no strict majority for one reply)")
    else:
        serve(RatingSource.from_config(config, args.config), store, args.host, args.port)
    return 0


def _copy_demo_checkpoint(dest: Path) -> None:
    """Copy the demo's pretrained model, when ``make demo`` has made it, to ``dest``: the open-weight
    stand-in that ``configs/finetune.yaml`` fine-tunes (a folder outside the store, as a download is)."""
    from tasks.engine import plan

    MODEL_DIR = "model"  # noqa: N806 - the folder every training stage exports (post_stage.MODEL_DIR, without torch)

    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    try:
        manifest = plan(load_config(demo))["pretrain"].manifest() if demo.is_file() else None
    except CrucibleError:  # the demo's own data is not there yet
        manifest = None
    if manifest is None:
        print(f"  {'checkpoint':<24} {dest}  (not yet: the demo's pretrain stage has not run)")
        return
    source = Path(manifest.path) / MODEL_DIR
    same = dest.is_dir() and sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in source.iterdir()) and all(
        filecmp.cmp(source / p.name, dest / p.name, shallow=False) for p in source.iterdir()
    )
    if not same:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
    print(f"  {'checkpoint':<24} {dest}  ({'unchanged' if same else 'copied from the demo pretrain stage'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crucible", description="Raw text to an aligned language model, one DAG.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (complete stages are skipped)")
    run.add_argument("config")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and every stage after it")
    run.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after STAGE")
    run.add_argument("--force", nargs="+", metavar="STAGE", help="rerun these stages and every configured stage downstream of them")
    run.set_defaults(fn=cmd_run)

    status = sub.add_parser("status", help="per stage: done or missing, fingerprint, output, counts")
    status.add_argument("config")
    status.add_argument("--json", action="store_true", help="machine-readable output (stable format)")
    status.set_defaults(fn=cmd_status)

    trace = sub.add_parser("trace", help="one document's lineage: each stage's verdict, its token shard and offsets, the pretrain steps that read it")
    trace.add_argument("config")
    trace.add_argument("doc_id", metavar="DOC_ID", help="a document id, '{source}/{id}' (as in every stage's `id` column)")
    trace.add_argument("--json", action="store_true", help="machine-readable output")
    trace.set_defaults(fn=cmd_trace)

    stages = sub.add_parser("stages", help="list the stages in pipeline order")
    stages.set_defaults(fn=cmd_stages)

    demo = sub.add_parser("demo-data", help="write the demo corpus from text already on this machine")
    demo.add_argument("dir")
    demo.set_defaults(fn=cmd_demo_data)

    rate = sub.add_parser("rate", help="a web page where people compare the evaluate stage's replies; votes give human Elo and preference data")
    rate.add_argument("config")
    rate.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    rate.add_argument("--port", type=int, default=8765)
    action = rate.add_mutually_exclusive_group()
    action.add_argument("--add-rater", metavar="NAME", help="print a new rating link for NAME instead of serving")
    action.add_argument("--export", metavar="FILE.jsonl", help="write the votes as prompt/chosen/rejected rows instead of serving")
    rate.set_defaults(fn=cmd_rate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CrucibleError as exc:
        print(f"crucible: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
