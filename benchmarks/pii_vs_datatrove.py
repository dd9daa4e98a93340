"""Crucible's ``pii`` redaction vs datatrove's ``PIIFormatter`` on the same seeded mix.

Prints, per PII kind, the share of injected items each removes, and per look-alike class the
share each alters (``tasks.data.pii_mix`` builds and scores the mix), plus throughput.
datatrove's formatter covers e-mails and public IPv4 addresses only; that is the point of
comparison, not a flaw in how it is called.

    .venv/bin/python benchmarks/pii_vs_datatrove.py [--seed 0] [--per-kind 100]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from datatrove.pipeline.formatters import PIIFormatter

from tasks.data.pii_detect import redact
from tasks.data.pii_mix import Item, MixScore, make_documents, make_items, score


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
    args = parser.parse_args()

    items = make_items(args.seed, args.per_kind)
    datatrove = PIIFormatter()
    results = {
        "crucible": measure(items, lambda text: redact(text).text),
        "datatrove": measure(items, datatrove.format),
    }
    crucible, datatrove_score = results["crucible"][0], results["datatrove"][0]
    n_pii, n_look = sum(crucible.injected.values()), sum(crucible.lookalikes.values())
    print(f"mix: seed {args.seed}, {n_pii} injected PII items, {n_look} look-alikes, {len(make_documents(items))} documents\n")
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
