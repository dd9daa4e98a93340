"""Wall time of ingest's main-text extraction (``_extract_page``, trafilatura) per web page size.

    python benchmarks/html_extraction.py [MB ...]     (default: 1 2 4 8)

The page is the ingest tests' news article (navigation, table, comments, footer around it)
with its paragraphs repeated to the size asked. Prints seconds per page and per MB: a
constant per-MB time means extraction grows linearly with page size.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_ingest import ARTICLE, web_page  # noqa: E402

from tasks.data.ingest import _extract_page  # noqa: E402


def page_of(megabytes: float) -> bytes:
    repeats = int(megabytes * 1_000_000 // len(" ".join(ARTICLE))) + 1
    return web_page(ARTICLE * repeats).encode()


def main() -> None:
    sizes = [float(a) for a in sys.argv[1:]] or [1, 2, 4, 8]
    _extract_page(page_of(0.01))  # imports and warm-up
    print(f"{'MB':>6} {'seconds':>9} {'s/MB':>7}")
    for size in sizes:
        page = page_of(size)
        started = time.monotonic()
        _extract_page(page)
        seconds = time.monotonic() - started
        print(f"{len(page) / 1e6:6.1f} {seconds:9.2f} {seconds / (len(page) / 1e6):7.2f}")


if __name__ == "__main__":
    main()
