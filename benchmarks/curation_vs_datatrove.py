"""Crucible's ``filter`` stage vs datatrove's own executor running the same filters on the same input.

The corpus is prose that every Crucible install carries: the long descriptions of the installed
Python distributions and the module docstrings of the standard library and site-packages, one
document each (real, varied, and full of the short texts, lists and markup the filters target).
Ingest turns it into Parquet shards; then both sides filter those shards with the same workers:

* Crucible: the ``filter`` stage (Ray Data actors), timed by the engine; its quality filters
  split words with ``tasks/data/filters/words.py`` (datatrove's spaCy tokenizer, each chunk
  tokenized once per worker: the same words);
* datatrove: ``LocalPipelineExecutor`` with ParquetReader -> language/toxicity/decontamination
  (Crucible's checks wrapped as one datatrove filter: datatrove's own language filter needs a
  downloaded fastText model) -> GopherQuality -> GopherRepetition -> C4Quality -> FineWebQuality
  -> JsonlWriter, built from the same config, with datatrove's own tokenizer.

Prints documents per second of each (wall time, start-up included), their ratio, and the share
of documents on which both made the same keep/drop decision, and the share of documents both
kept whose text is the same (C4 drops lines on both sides).

    .venv/bin/python benchmarks/curation_vs_datatrove.py --docs 2000 --workers 2

``--corpus DIR`` filters the ``*.jsonl`` documents of ``DIR`` instead (a proportional sample of
``--docs``), e.g. the held-out corpus that ``benchmarks/heldout_corpus.py`` writes.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from heldout_corpus import read_texts

os.environ.setdefault("CRUCIBLE_PROGRESS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DOCSTRING = re.compile(r"\A(?:\s*#[^\n]*\n)*\s*[rRuU]?(\"\"\"|''')(.*?)\1", re.DOTALL)
MIN_CHARS = 200


def prose_corpus(limit: int) -> list[str]:
    """Distribution descriptions, then module docstrings, in a fixed order, up to ``limit``."""
    texts: list[str] = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(body) >= MIN_CHARS:
            texts.append(body)
    roots = dict.fromkeys([sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]])
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if len(texts) >= limit:
                    return texts
                if name.endswith(".py"):
                    head = Path(folder, name).read_text(encoding="utf-8", errors="replace")[:20_000]
                    found = DOCSTRING.match(head)
                    if found and len(found.group(2).strip()) >= MIN_CHARS:
                        texts.append(found.group(2).strip())
    return texts[:limit]


def filter_section(workers: int, eval_path: Path) -> dict:
    return {
        "default": {"langid": {"languages": ["en"]}},
        "num_workers": workers,
        "decontamination": {"files": [{"path": str(eval_path), "text_fields": ["text"]}]},
    }


def run_crucible(corpus_dir: Path, store: Path, workers: int, eval_path: Path) -> tuple[float, dict[str, str], list[str], Path]:
    from tasks.config import validate_config
    from tasks.engine import run_pipeline

    config = validate_config({
        "name": "bench-filter",
        "store": str(store),
        "ray": {"num_cpus": workers},
        "ingest": {"sources": [{"name": "docs", "path": str(corpus_dir / "*.jsonl"), "domain": "web", "id_field": "id"}]},
        "filter": filter_section(workers, eval_path),
    }, "benchmark")
    ingest, filtered = run_pipeline(config, until_stage="filter")
    import pyarrow.parquet as pq

    kept = {row["id"]: row["text"] for p in filtered.manifest.file_paths("documents")
            for row in pq.read_table(p, columns=["id", "text"]).to_pylist()}
    all_ids = [i for p in ingest.manifest.file_paths("documents") for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    return filtered.duration_s, kept, all_ids, Path(ingest.manifest.path) / "documents"


def datatrove_pipeline(section: dict, input_dir: Path, out_dir: Path) -> list:
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter

    from tasks.data.filter import FilterConfig
    from tasks.data.filters.decontam import build_index

    cfg = FilterConfig.model_validate(section)
    rules = cfg.default

    class CrucibleScreens(BaseFilter):
        """Language, toxicity and decontamination, as Crucible applies them, in one datatrove filter."""

        name = "crucible screens"

        def __init__(self) -> None:
            super().__init__(batch_size=256)
            self.cfg = cfg
            self.doc_filter = None

        def filter(self, doc: Document) -> bool | tuple[bool, str]:
            return self.filter_batch([doc])[0]

        def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
            import pyarrow as pa

            if self.doc_filter is None:  # built in the worker: models load once per process
                no_quality = {k: None for k in ("gopher_quality", "gopher_repetition", "c4", "fineweb")}
                screens = FilterConfig.model_validate({"default": {**rules.model_dump(), **no_quality}})
                self.doc_filter = screens.document_filter(build_index(self.cfg.decontamination))
            table = pa.table({"text": [d.text for d in batch], "domain": ["web"] * len(batch)})
            reasons = self.doc_filter.annotate(table).column("reason").to_pylist()
            return [True if r is None else (False, r) for r in reasons]

    return [
        ParquetReader(str(input_dir), glob_pattern="*.parquet", id_key="id", text_key="text"),
        CrucibleScreens(),
        *(getattr(rules, family).make("en") for family in ("gopher_quality", "gopher_repetition", "c4", "fineweb")),
        JsonlWriter(str(out_dir), output_filename="${rank}.jsonl.gz"),
    ]


def run_datatrove(input_dir: Path, out_dir: Path, logs: Path, workers: int, eval_path: Path) -> tuple[float, dict[str, str]]:
    from datatrove.executor import LocalPipelineExecutor

    shards = len(list(input_dir.glob("*.parquet")))
    pipeline = datatrove_pipeline(filter_section(workers, eval_path), input_dir, out_dir)
    began = time.monotonic()
    LocalPipelineExecutor(pipeline, tasks=shards, workers=workers, logging_dir=str(logs), skip_completed=False).run()
    seconds = time.monotonic() - began
    kept = {}
    for path in out_dir.glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            kept.update((doc["id"], doc["text"]) for doc in map(json.loads, lines))
    return seconds, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=4, help="input files (datatrove parallelises over files)")
    parser.add_argument("--corpus", type=Path, default=None, help="folder of *.jsonl documents instead of the built-in corpus")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crucible-bench-"))
    os.environ.setdefault("CRUCIBLE_HOME", str(work / "home"))
    texts = read_texts(args.corpus, args.docs) if args.corpus else prose_corpus(args.docs)
    corpus = work / "corpus"
    corpus.mkdir()
    for shard in range(args.shards):
        rows = [{"id": f"{i:06d}", "text": t} for i, t in enumerate(texts) if i % args.shards == shard]
        (corpus / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    evals = work / "evals.jsonl"  # every 50th document doubles as an "evaluation example"
    evals.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[::50]), encoding="utf-8")

    ours_s, ours_kept, ids, ingested = run_crucible(corpus, work / "store", args.workers, evals)
    theirs_s, theirs_kept = run_datatrove(ingested, work / "datatrove-out", work / "datatrove-logs", args.workers, evals)
    ours_rate, theirs_rate = len(ids) / ours_s, len(ids) / theirs_s
    agree = sum((i in ours_kept) == (i in theirs_kept) for i in ids) / max(1, len(ids))
    print(f"corpus: {args.corpus or 'package descriptions + module docstrings'}")
    print(f"documents: {len(ids)}  workers: {args.workers}  input shards: {args.shards}")
    print(f"crucible filter stage : {ours_s:7.1f} s  {ours_rate:8.1f} docs/s  kept {len(ours_kept)}")
    print(f"datatrove local exec. : {theirs_s:7.1f} s  {theirs_rate:8.1f} docs/s  kept {len(theirs_kept)}")
    print(f"speed ratio (crucible / datatrove): {ours_rate / theirs_rate:.2f}")
    print(f"keep/drop agreement: {agree:.2%}")
    both = ours_kept.keys() & theirs_kept.keys()
    same_text = sum(ours_kept[i] == theirs_kept[i] for i in both) / max(1, len(both))
    print(f"kept by both: {len(both)}, same text: {same_text:.2%}")


if __name__ == "__main__":
    sys.exit(main())
