"""Crucible's ``pii`` redaction vs datatrove's ``PIIFormatter`` on the same seeded mix.

Prints, per PII kind, the share of injected items each removes, and per look-alike class the
share each alters (``tasks.data.pii_mix`` builds and scores the mix), plus throughput.
datatrove's formatter covers e-mails and public IPv4 addresses only; that is the point of
comparison, not a flaw in how it is called.

    .venv/bin/python benchmarks/pii_vs_datatrove.py [--seed 0] [--per-kind 100] [--corpus DIR]

``--corpus DIR`` places every item inside a real sentence of the ``*.jsonl`` documents of
``DIR`` (``pii_mix.context_sentences``) instead of filler words, e.g. the held-out corpus that
``benchmarks/heldout_corpus.py`` writes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from datatrove.pipeline.formatters import PIIFormatter
from heldout_corpus import read_texts

from tasks.data.pii_detect import redact
from tasks.data.pii_mix import Item, MixScore, context_sentences, make_documents, make_items, score


def measure(items: list[Item], redactor: Callable[[str], str]) -> tuple[MixScore, float]:
    """The mix's score, and the redactor's throughput in MB/s over the mix's documents."""
    documents = make_documents(items)
    began = time.perf_counter()
    for document in documents:
        redactor(document)
    seconds = time.perf_counter() - began
    return score(items, redactor), sum(len(d.encode()) for d in documents) / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=100, help="items per PII kind and per look-alike class")
    parser.add_argument("--corpus", type=Path, default=None, help="folder of *.jsonl documents whose sentences carry the items")
    args = parser.parse_args()

    context = context_sentences(read_texts(args.corpus, None)) if args.corpus else None
    items = make_items(args.seed, args.per_kind, context)
    datatrove = PIIFormatter()
    results = {
        "crucible": measure(items, lambda text: redact(text).text),
        "datatrove": measure(items, datatrove.format),
    }
    crucible, datatrove_score = results["crucible"][0], results["datatrove"][0]
    n_pii, n_look = sum(crucible.injected.values()), sum(crucible.lookalikes.values())
    where = f"{len(context)} sentences of {args.corpus}" if context else "filler words"
    print(f"mix: seed {args.seed}, items inside {where}, {n_pii} injected PII items, {n_look} look-alikes, {len(make_documents(items))} documents\n")
    print("| | crucible | datatrove PIIFormatter |\n|---|---|---|")
    for kind in sorted(crucible.injected):
        print(f"| removed: {kind} | {crucible.removed[kind] / crucible.injected[kind]:.1%} "
              f"| {datatrove_score.removed[kind] / datatrove_score.injected[kind]:.1%} |")
    for kind in sorted(crucible.lookalikes):
        print(f"| altered: {kind} | {crucible.altered[kind] / crucible.lookalikes[kind]:.1%} "
              f"| {datatrove_score.altered[kind] / datatrove_score.lookalikes[kind]:.1%} |")
    print(f"| **PII removed, all kinds** | **{crucible.removed_share:.1%}** | **{datatrove_score.removed_share:.1%}** |")
    print(f"| **look-alikes altered** | **{crucible.altered_share:.1%}** | **{datatrove_score.altered_share:.1%}** |")
    print(f"| throughput (MB/s, one core) | {results['crucible'][1]:.2f} | {results['datatrove'][1]:.2f} |")


if __name__ == "__main__":
    main()
