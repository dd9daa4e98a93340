"""Crucible's MinHash dedup against datatrove's four-stage MinHash pipeline, on one corpus.

The corpus has controlled near-duplicates: base documents of random words, some with variants
made by random word edits (substitutions, insertions, deletions at a per-variant rate), some with
exact copies that differ only in case, punctuation and spacing. Ground truth is the exact
word-5-gram Jaccard of every pair that shares at least one 5-gram (found with an inverted index,
so no pair is missed). Both systems read the same Parquet shards with the same number of workers:

* datatrove: ``MinhashDedupSignature`` -> ``MinhashDedupBuckets`` -> ``MinhashDedupCluster`` ->
  ``MinhashDedupFilter`` under ``LocalPipelineExecutor`` (its default config: 5-grams, 14 x 8);
* Crucible: ``tasks.data.dedup.Deduplicator`` on a local Ray with as many CPUs (defaults:
  exact pass, 5-grams, 20 x 5, exact-Jaccard verification at 0.8).

Printed per system: wall time, documents removed (ideal: all but one per connected component of
the pairs with Jaccard >= 0.8), recall on pairs with Jaccard >= 0.8 (the pair
is caught when at most one of the two survives), false merges (documents with no partner above
Jaccard 0.5 that were removed) and removals without any partner >= 0.8.

    .venv/bin/python benchmarks/minhash_vs_datatrove.py --bases 4000 --workers 2

``--corpus DIR`` takes the bases from the ``*.jsonl`` documents of ``DIR`` (real text with its
own near-duplicates), e.g. the held-out corpus that ``benchmarks/heldout_corpus.py`` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from heldout_corpus import read_texts

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "to", "sa", "vi", "de", "po", "la", "re", "chi", "ba", "go", "fu", "mo", "te"]


# ---------------------------------------------------------------------------------- corpus


def make_corpus(bases: int, seed: int, texts: list[str] | None = None) -> list[dict]:
    """Documents with ids ``b{n}`` (bases), ``b{n}v{k}`` (edited variants), ``b{n}c`` (exact copies).

    Bases are random words, or with ``texts`` the opening words of those real documents (one
    base each, edits drawing from their vocabulary), which also brings the near-duplicates the
    real documents already have among themselves.
    """
    rng = random.Random(seed)
    if texts is None:
        vocab = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(60_000)})
        base_words = lambda n: [rng.choice(vocab) for _ in range(rng.randint(80, 400))]  # noqa: E731
    else:
        vocab = sorted({word for text in texts for word in text.split()})
        base_words = lambda n: texts[n].split()[: rng.randint(80, 400)]  # noqa: E731
        bases = min(bases, len(texts))
    docs = []

    def render(words: list[str]) -> str:  # sentences: capitalized, with periods
        out, i = [], 0
        while i < len(words):
            n = rng.randint(6, 18)
            chunk = words[i : i + n]
            out.append(" ".join([chunk[0].capitalize(), *chunk[1:]]) + ".")
            i += n
        return " ".join(out)

    for n in range(bases):
        words = base_words(n)
        docs.append({"id": f"b{n}", "text": render(words)})
        if rng.random() < 0.35:  # a family of edited variants
            for k in range(rng.randint(1, 4)):
                rate = rng.uniform(0.0, 0.12)
                variant = list(words)
                for _ in range(max(1, round(rate * len(words)))):
                    op, i = rng.random(), rng.randrange(len(variant))
                    if op < 0.5:
                        variant[i] = rng.choice(vocab)
                    elif op < 0.75:
                        variant.insert(i, rng.choice(vocab))
                    elif len(variant) > 10:
                        del variant[i]
                docs.append({"id": f"b{n}v{k}", "text": render(variant)})
        if rng.random() < 0.05:  # an exact copy up to case and punctuation
            docs.append({"id": f"b{n}c", "text": docs[-1]["text"].upper().replace(".", " !")})
    rng.shuffle(docs)
    return docs


def ground_truth(docs: list[dict]) -> dict[tuple[str, str], float]:
    """Exact word-5-gram Jaccard of every pair of documents sharing at least one 5-gram."""
    from tasks.data.minhash import normalized_words

    words = normalized_words(pa.array([d["text"] for d in docs])).to_pylist()
    grams = [{tuple(w[i : i + 5]) for i in range(max(1, len(w) - 4))} for w in words]
    index: dict[tuple, list[int]] = defaultdict(list)
    for doc, gram_set in enumerate(grams):
        for gram in gram_set:
            index[gram].append(doc)
    pairs = {(a, b) for posting in index.values() if len(posting) > 1 for i, a in enumerate(posting) for b in posting[i + 1 :]}
    return {
        (docs[a]["id"], docs[b]["id"]): len(grams[a] & grams[b]) / len(grams[a] | grams[b]) for a, b in pairs
    }


def ideal_removals(ids: list[str], truth: dict[tuple[str, str], float]) -> int:
    """Documents a perfect dedup at 0.8 removes: all but one of each component of the >= 0.8 pairs."""
    from tasks.data.clusters import union_find

    index = {doc_id: i for i, doc_id in enumerate(ids)}
    pairs = np.array([(index[a], index[b]) for (a, b), j in truth.items() if j >= 0.8], dtype=np.int64).reshape(-1, 2)
    return len(ids) - len(np.unique(union_find(len(ids), pairs[:, 0], pairs[:, 1])))


def score(name: str, ids: list[str], kept: set[str], truth: dict[tuple[str, str], float], seconds: float) -> dict:
    positives = [pair for pair, j in truth.items() if j >= 0.8]
    best: dict[str, float] = defaultdict(float)
    for (a, b), j in truth.items():
        best[a], best[b] = max(best[a], j), max(best[b], j)
    isolated = [i for i in ids if best[i] <= 0.5]
    removed = [i for i in ids if i not in kept]
    return {
        "system": name,
        "seconds": round(seconds, 1),
        "removed": len(removed),
        "recall_at_0.8": sum(not (a in kept and b in kept) for a, b in positives) / max(1, len(positives)),
        "false_merge_rate": sum(i not in kept for i in isolated) / max(1, len(isolated)),
        "removed_without_0.8_partner": sum(best[i] < 0.8 for i in removed),
    }


# ---------------------------------------------------------------------------------- systems


def run_datatrove(shards: Path, work: Path, workers: int, files: int) -> tuple[set[str], float]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig()
    reader = ParquetReader(str(shards), text_key="text", id_key="id")
    started = time.monotonic()
    signatures = LocalPipelineExecutor(
        [reader, MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
        tasks=files, workers=workers, logging_dir=str(work / "logs/sigs"),
    )
    buckets = LocalPipelineExecutor(
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        tasks=config.num_buckets, workers=workers, logging_dir=str(work / "logs/buckets"), depends=signatures,
    )
    clusters = LocalPipelineExecutor(
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
        tasks=1, logging_dir=str(work / "logs/clusters"), depends=buckets,
    )
    LocalPipelineExecutor(
        [reader, MinhashDedupFilter(input_folder=str(work / "remove")),
         JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl", compression=None)],
        tasks=files, workers=workers, logging_dir=str(work / "logs/filter"), depends=clusters,
    ).run()
    seconds = time.monotonic() - started
    kept = {json.loads(line)["id"] for f in (work / "kept").glob("*.jsonl") for line in f.open()}
    return kept, seconds


def run_crucible(paths: list[str], work: Path, workers: int) -> tuple[set[str], float, float, str]:
    import pyarrow.fs as pafs
    import ray

    from tasks.data.dedup import DedupConfig, Deduplicator
    from tasks.store import StageDir

    started = time.monotonic()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.get([ray.remote(lambda: None).remote() for _ in range(workers)])  # workers up
    startup = time.monotonic() - started
    out = StageDir.at(str(work), "dedup", "bench")
    for folder in ("documents", "rejected"):
        out.make(folder)
    started = time.monotonic()
    result = Deduplicator(DedupConfig(), pafs.LocalFileSystem(), paths, out).run()
    seconds = time.monotonic() - started
    kept = set(pa.concat_tables([pq.read_table(p) for p in Path(out.root, "documents").glob("*.parquet")]).column("id").to_pylist())
    ray.shutdown()
    return kept, seconds, startup, result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", type=int, default=4000, help="base documents (variants and copies come on top)")
    parser.add_argument("--workers", type=int, default=2, help="datatrove workers = Ray CPUs")
    parser.add_argument("--files", type=int, default=4, help="Parquet shards of the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, default=None, help="folder of *.jsonl documents whose texts become the bases")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="minhash-bench-"))
    try:
        docs = make_corpus(args.bases, args.seed, read_texts(args.corpus, args.bases) if args.corpus else None)
        table = pa.Table.from_pylist(docs)
        paths = []
        for k in range(args.files):
            path = work / "corpus" / f"part-{k:03d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.take(list(range(k, len(docs), args.files))), path)
            paths.append(str(path))
        truth = ground_truth(docs)
        ids = [d["id"] for d in docs]
        positives = sum(j >= 0.8 for j in truth.values())
        print(f"corpus: {args.corpus or 'random words'}: {len(docs)} documents, {sum(len(d['text'].split()) for d in docs)} words, "
              f"{positives} pairs with Jaccard >= 0.8, {len(truth)} pairs sharing a 5-gram, "
              f"{ideal_removals(ids, truth)} documents to remove; "
              f"{args.workers} workers, load average {os.getloadavg()[0]:.1f}")

        kept, seconds = run_datatrove(work / "corpus", work / "datatrove", args.workers, args.files)
        rows = [score("datatrove (14x8, no verification)", ids, kept, truth, seconds)]
        kept, seconds, startup, report = run_crucible(paths, work / "crucible", args.workers)
        rows.append(score("crucible (20x5, exact Jaccard)", ids, kept, truth, seconds))
        print(f"crucible: Ray start-up {startup:.1f}s (once per pipeline, not in its time below)\n{report}")
        print(f"{'system':38} {'seconds':>8} {'removed':>8} {'recall@0.8':>11} {'false merges':>13} {'removed w/o 0.8 partner':>24}")
        for row in rows:
            print(f"{row['system']:38} {row['seconds']:8.1f} {row['removed']:8d} {row['recall_at_0.8']:11.4f} "
                  f"{row['false_merge_rate']:13.4%} {row['removed_without_0.8_partner']:24d}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
