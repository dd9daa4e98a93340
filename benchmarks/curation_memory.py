"""Peak memory of the curation stages (ingest -> filter -> dedup -> pii) at 1x and 4x the corpus.

The data stages stream: every worker holds one batch or one row group, and the driver holds
what grows with the duplicates, not with the corpus. This script checks that claim where it
matters, on the whole run: the driver and every process of the embedded Ray it starts (GCS,
raylet, agents, workers, filter actors), summed. A background thread samples them with psutil
every ``--interval`` seconds; PSS (shared pages split between the processes that map them, so
Ray's shared-memory object store is counted once) is the headline, RSS is printed beside it.

Each size runs in a fresh process with its own Ray and state dir, so nothing the first run
loaded or cached is reused by the second. The corpus is text already on the machine: the demo
corpus (``tasks.data.demo_corpus``: project pages, licenses, stdlib code, Python docs) plus the
module docstrings that ``curation_vs_datatrove`` filters, at their configs from
``configs/demo.yaml``. The 4x corpus is all of it (or ``--docs``), the 1x corpus every fourth
document of it, so both have the same mix of domains and lengths; files hold ``--per-file``
documents, so the 4x corpus comes as four times the files, as a bigger crawl does.

    .venv/bin/python benchmarks/curation_memory.py [--docs 3000] [--corpus DIR]

``--corpus DIR`` reads ``*.jsonl`` sources (``id``, ``text``; domain from the file name, as the
demo corpus writes them) instead, e.g. a held-out corpus from ``benchmarks/heldout_corpus.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import psutil
import yaml
from heldout_corpus import read_sources, sample_sources

os.environ.setdefault("CRUCIBLE_PROGRESS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

STAGES = ("ingest", "filter", "dedup", "pii")
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MB = 1024**2
RAY_START_ATTEMPTS = 3


class PeakSampler(threading.Thread):
    """Peak summed PSS/RSS of this process and all its descendants, overall and per phase."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "start"
        self.peak: dict[str, dict[str, int]] = {}
        self.processes = 0
        self._halt = threading.Event()
        self._me = psutil.Process()

    def sample(self) -> tuple[int, int, int]:
        """(PSS, RSS, process count) now; processes that exit mid-sample are skipped."""
        pss = rss = count = 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss, rss, count = pss + info.pss, rss + info.rss, count + 1
        return pss, rss, count

    def record(self) -> None:
        pss, rss, count = self.sample()
        for key in (self.phase, "total"):
            peak = self.peak.setdefault(key, {"pss": 0, "rss": 0})
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
        self.processes = max(self.processes, count)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.record()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.record()


# ---------------------------------------------------------------------------------- corpus


def default_corpus() -> dict[str, list[dict[str, Any]]]:
    """The demo corpus's four domains plus the filter benchmark's docstrings (as ``web``)."""
    from curation_vs_datatrove import prose_corpus

    from tasks.data.demo_corpus import DOMAINS

    sources = {domain: [{"id": d["id"], "text": d["text"]} for d in documents()] for domain, documents in DOMAINS.items()}
    sources["prose"] = [{"id": f"{i:06d}", "text": t} for i, t in enumerate(prose_corpus(10**7))]
    return sources


def write_sources(sources: dict[str, list[dict[str, Any]]], folder: Path, every: int, per_file: int) -> int:
    """Every ``every``-th document of each source into ``folder/{source}/part-{n}.jsonl``, at most
    ``per_file`` documents a file (a bigger corpus comes as more files, as crawls do); returns
    the number of documents written."""
    written = 0
    for name, docs in sources.items():
        chosen = docs[::every]
        (folder / name).mkdir(parents=True)
        for n in range(0, len(chosen), per_file):
            lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in chosen[n : n + per_file])
            (folder / name / f"part-{n // per_file:04d}.jsonl").write_text(lines, encoding="utf-8")
        written += len(chosen)
    return written


def pipeline_config(corpus: Path, work: Path, cpus: int) -> dict[str, Any]:
    """ingest -> filter -> dedup -> pii with the demo pipeline's settings; one source per
    folder of ``corpus``, its domain the folder's name (``prose`` filters as ``web``)."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    domains = {"prose": "web"}
    sources = [
        {"name": p.name, "path": str(p / "*.jsonl"), "format": "jsonl", "id_field": "id", "domain": domains.get(p.name, p.name)}
        for p in sorted(corpus.iterdir())
    ]
    return {
        "name": "bench-memory", "store": str(work / "store"), "ray": {"num_cpus": cpus},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
        "ingest": {"sources": sources}, **{stage: demo[stage] for stage in STAGES[1:]},
    }


# ---------------------------------------------------------------------------------- one run


def measure(corpus: str, work: str, cpus: int, interval: float) -> dict[str, Any]:
    """Run the four stages in this (fresh) process and return its memory peaks in MB."""
    os.environ["CRUCIBLE_HOME"] = str(Path(work) / "home")
    import ray

    from tasks.config import validate_config
    from tasks.engine import run_pipeline
    from tasks.ray_runtime import ensure_ray

    config = validate_config(pipeline_config(Path(corpus), Path(work), cpus), "benchmark")
    sampler = PeakSampler(interval)
    sampler.start()
    sampler.phase = "ray start"
    for attempt in range(RAY_START_ATTEMPTS):  # on a loaded machine the raylet can miss Ray's 30 s start-up window
        try:
            ensure_ray(config.ray)
            break
        except Exception as exc:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(exc) or attempt == RAY_START_ATTEMPTS - 1:
                raise
    time.sleep(2)
    idle = sampler.sample()[0]
    stages: dict[str, str] = {}

    def next_phase(stage: str, _state: str, outcome: Any, seconds: float) -> None:
        stages[stage] = f"{outcome.manifest.rows if outcome else '-'} rows, {seconds:.0f}s"
        later = STAGES[STAGES.index(stage) + 1 :]
        sampler.phase = later[0] if later else "done"

    sampler.phase = STAGES[0]
    began = time.monotonic()
    run_pipeline(config, until_stage=STAGES[-1], on_outcome=next_phase)
    seconds = time.monotonic() - began
    sampler.stop()
    ray.shutdown()
    peaks = {phase: {k: v / MB for k, v in peak.items()} for phase, peak in sampler.peak.items()}
    return {"seconds": seconds, "idle_pss": idle / MB, "peaks": peaks, "stages": stages, "processes": sampler.processes}


def run_isolated(corpus: Path, work: Path, cpus: int, interval: float) -> dict[str, Any]:
    """``measure`` in a fresh interpreter (spawned, so it inherits no Ray and no imports)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, str(corpus), str(work), cpus, interval).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="documents of the 4x corpus (default: all there are)")
    parser.add_argument("--corpus", type=Path, default=None, help="folder of *.jsonl sources instead of the built-in corpus")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--per-file", type=int, default=250, help="documents per input file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crucible-memory-"))
    sources = sample_sources(read_sources(args.corpus) if args.corpus else default_corpus(), args.docs)
    results = {}
    for scale, every in (("1x", 4), ("4x", 1)):
        docs = write_sources(sources, work / scale / "corpus", every, args.per_file)
        size = sum(p.stat().st_size for p in (work / scale / "corpus").rglob("*.jsonl")) / MB
        files = len(list((work / scale / "corpus").rglob("*.jsonl")))
        results[scale] = {"docs": docs, "mb": size, "files": files, **run_isolated(work / scale / "corpus", work / scale, args.cpus, args.interval)}
        print(f"{scale}: {json.dumps(results[scale])}", flush=True)  # kept if the next size never finishes

    one, four = results["1x"], results["4x"]
    print(f"corpus: {args.corpus or 'demo corpus + stdlib/site-packages docstrings'}; {args.cpus} Ray CPUs; "
          f"sampled every {args.interval}s; work dir {work}")
    print(f"{'':24} {'1x':>12} {'4x':>12} {'4x / 1x':>9}")
    print(f"{'input files':24} {one['files']:12d} {four['files']:12d}")
    print(f"{'documents':24} {one['docs']:12d} {four['docs']:12d} {four['docs'] / one['docs']:9.2f}")
    print(f"{'input MB':24} {one['mb']:12.1f} {four['mb']:12.1f} {four['mb'] / one['mb']:9.2f}")
    print(f"{'wall s (4 stages)':24} {one['seconds']:12.1f} {four['seconds']:12.1f} {four['seconds'] / one['seconds']:9.2f}")
    print(f"{'processes (max)':24} {one['processes']:12d} {four['processes']:12d}")
    print(f"{'idle Ray PSS MB':24} {one['idle_pss']:12.0f} {four['idle_pss']:12.0f}")
    for phase in (*STAGES, "total"):
        for kind in ("pss", "rss"):
            a, b = one["peaks"].get(phase, {}).get(kind, 0), four["peaks"].get(phase, {}).get(kind, 0)
            print(f"{f'peak {kind.upper()} MB {phase}':24} {a:12.0f} {b:12.0f} {b / max(a, 1e-9):9.2f}")
    above = (four["peaks"]["total"]["pss"] - four["idle_pss"]) / max(1e-9, one["peaks"]["total"]["pss"] - one["idle_pss"])
    print(f"per stage 1x: {one['stages']}")
    print(f"per stage 4x: {four['stages']}")
    print(f"peak PSS ratio 4x/1x: {four['peaks']['total']['pss'] / one['peaks']['total']['pss']:.2f} "
          f"(above idle Ray: {above:.2f}); acceptance: <= 1.5")


if __name__ == "__main__":
    main()
