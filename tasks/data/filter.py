"""``filter``: keep the documents worth training on, and say why every other one was dropped.

Checks run per domain (see ``tasks.data.filters``): language ID, toxicity, decontamination
against evaluation sets, then datatrove's Gopher/C4/FineWeb prose filters, or code heuristics
for code domains. Kept rows go to ``documents/``, removed rows to ``rejected/`` with a
``reason``; both gain ``lang``, ``lang_score`` and ``toxicity`` columns. A few removed documents
per reason go to ``samples/removed.jsonl`` for audit.

The unit of work is one row group of one upstream shard: a Ray Data actor pool streams the
units, each actor reads its row group in Arrow batches and writes
``documents/{shard}-rg{n}.parquet`` (and its ``rejected/`` twin) under a temporary name, then
renames it. Memory per worker is one batch whatever the corpus size, shard names are
deterministic, and a rerun after a crash reuses every finished shard (its counts live in the
shard's Parquet metadata). Last, the driver writes ``ids/`` (``tasks/data/id_index.py``): the id,
reason and shard of every removed document, which ``crucible trace`` looks documents up in (a
document ingest read that is not there was kept).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from tasks.data.filters.batch import REASON_FIELD, DocumentFilter, output_schema
from tasks.data.filters.decontam import DecontaminationConfig, EvalIndex, build_index, eval_files_digest
from tasks.data.filters.rules import RuleSet, resolve_rules
from tasks.data.id_index import constant, shard_tables, write_id_index
from tasks.stage import Manifest, Stage, StageContext, StageResult
from tasks.store import StageDir

STATS_KEY = b"crucible.filter_stats"
SAMPLE_CHARS = 2000
ID_INDEX_SCHEMA = pa.schema([("id", pa.string()), REASON_FIELD, ("shard", pa.dictionary(pa.int32(), pa.string()))])


class FilterConfig(BaseModel):
    """Which documents to keep: a default rule set, per-domain overrides, decontamination."""

    model_config = ConfigDict(extra="forbid")

    default: RuleSet = Field(default_factory=RuleSet, description="checks for every domain without an override")
    code_domains: list[str] = Field(
        ["code"], description="domains holding source code: prose checks off, code checks on (before overrides)"
    )
    domains: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-domain overrides, merged key by key onto the default, e.g. {web: {gopher_quality: {min_doc_words: 80}}}",
    )
    decontamination: DecontaminationConfig | None = Field(None, description="evaluation sets to keep out of training data")
    rows_per_batch: int = Field(1024, ge=1, description="rows read and filtered at a time by one worker")
    num_workers: int | None = Field(None, ge=1, description="filter actors (default: one per CPU, at most one per shard)")
    samples_per_reason: int = Field(5, ge=0, description="removed documents per reason written to samples/removed.jsonl")

    _rules: dict[str, RuleSet] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_domains(self) -> FilterConfig:
        self._rules = resolve_rules(self.default, self.domains, self.code_domains)
        return self

    def rules_by_domain(self) -> dict[str, RuleSet]:
        """Effective rule sets of the domains with their own (others use ``default``)."""
        return dict(self._rules)

    def document_filter(self, index: EvalIndex | None = None) -> DocumentFilter:
        return DocumentFilter(self.default, self.rules_by_domain(), index)


def inputs_digest(cfg: FilterConfig, _pipeline: Any) -> str:
    """Beyond its config, the output depends on the evaluation files' contents."""
    return eval_files_digest(cfg.decontamination) if cfg.decontamination else ""


# ---------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Unit:
    """One row group of one upstream shard, and the name of the shards it becomes."""

    path: str
    row_group: int
    name: str


def upstream_documents(manifest: Manifest) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of an upstream stage and its document shards' paths inside it."""
    fs, paths = manifest.files_in("documents")
    return fs, [p for p in paths if p.endswith(".parquet")]


def list_units(fs: pafs.FileSystem, paths: list[str]) -> list[Unit]:
    """Every row group of every shard; output names keep the shard's name for traceability."""
    units = []
    for path in sorted(paths):
        stem = path.rsplit("/documents/", 1)[-1].removesuffix(".parquet").replace("/", "--")
        with fs.open_input_file(path) as handle:
            groups = pq.ParquetFile(handle).metadata.num_row_groups
        units += [Unit(path, g, f"{stem}-rg{g:05d}.parquet") for g in range(groups)]
    return units


class _ShardWriter:
    """Writes Arrow tables to one Parquet file under a temporary name, renamed on close."""

    def __init__(self, fs: pafs.FileSystem, final: str, schema: pa.Schema):
        self.fs, self.final, self.schema = fs, final, schema
        self.writer: pq.ParquetWriter | None = None
        if fs.get_file_info(f"{final}.partial").type == pafs.FileType.File:  # left by a crashed attempt
            fs.delete_file(f"{final}.partial")

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(f"{self.final}.partial", self.schema, filesystem=self.fs)
        self.writer.write_table(table.cast(self.schema))

    def close(self, metadata: dict[bytes, bytes] | None = None, keep_empty: bool = False) -> None:
        if self.writer is None:
            if not keep_empty:
                return
            self.write(self.schema.empty_table())
        if metadata:
            self.writer.add_key_value_metadata(metadata)
        self.writer.close()
        self.fs.move(f"{self.final}.partial", self.final)


def _char_count(texts: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.utf8_length(texts)).as_py() or 0)


@dataclass
class Totals:
    """Counts of one shard (stored in its metadata) or of the whole stage."""

    rows_in: int = 0
    rows_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    reused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    domain_in: Counter[str] = field(default_factory=Counter)
    domain_out: Counter[str] = field(default_factory=Counter)
    langs: Counter[str] = field(default_factory=Counter)

    def count_batch(self, source: pa.Table, kept: pa.Table, removed: pa.Table) -> None:
        """Count one batch: ``source`` as it came in (C4 may have shortened the kept texts)."""
        self.rows_in += source.num_rows
        self.rows_out += kept.num_rows
        self.chars_in += _char_count(source.column("text"))
        self.chars_out += _char_count(kept.column("text"))
        self.domain_in.update(source.column("domain").to_pylist())
        self.domain_out.update(kept.column("domain").to_pylist())
        self.reasons.update(removed.column("reason").to_pylist())
        self.langs.update(lang for lang in kept.column("lang").to_pylist() if lang)

    def add(self, stats: dict[str, Any]) -> None:
        """Add a shard's counts (the fields of its ``Totals``)."""
        for key in ("rows_in", "rows_out", "chars_in", "chars_out", "reused"):
            setattr(self, key, getattr(self, key) + stats[key])
        for key in ("reasons", "domain_in", "domain_out", "langs"):
            getattr(self, key).update(stats[key])

    def families(self) -> Counter[str]:
        """Removals by check (``gopher_quality:gopher_short_doc`` counts under ``gopher_quality``)."""
        out: Counter[str] = Counter()
        for reason, n in self.reasons.items():
            out[reason.split(":", 1)[0]] += n
        return out

    def counts(self, shards: int) -> dict[str, int]:
        counts = {"rows_in": self.rows_in, "rows_out": self.rows_out, "removed": self.rows_in - self.rows_out,
                  "chars_in": self.chars_in, "chars_out": self.chars_out, "shards": shards, "reused_shards": self.reused}
        counts |= {f"removed.{reason}": n for reason, n in sorted(self.reasons.items())}
        counts |= {f"removed_by_check.{family}": n for family, n in sorted(self.families().items())}
        counts |= {f"rows_in.{domain}": n for domain, n in sorted(self.domain_in.items())}
        counts |= {f"removed_by_domain.{d}": n - self.domain_out[d] for d, n in sorted(self.domain_in.items())}
        counts |= {f"kept_lang.{lang}": n for lang, n in sorted(self.langs.items())}
        return counts

    def metrics(self, seconds: float) -> dict[str, float]:
        metrics = {
            "keep_rate": self.rows_out / max(1, self.rows_in),
            "char_keep_rate": self.chars_out / max(1, self.chars_in),
            "docs_per_s": self.rows_in / max(seconds, 1e-9),
        }
        metrics |= {f"removed_share.{family}": n / max(1, self.rows_in) for family, n in sorted(self.families().items())}
        return metrics

    def report(self, index: EvalIndex | None) -> str:
        removed = self.rows_in - self.rows_out
        lines = [
            f"Kept **{self.rows_out}** of {self.rows_in} documents ({self.rows_out / max(1, self.rows_in):.1%}) and "
            f"{self.chars_out} of {self.chars_in} characters; **{removed}** removed (see `rejected/`, "
            "examples in `samples/removed.jsonl`).",
            "",
            "| reason | removed | share of input |",
            "|---|---|---|",
        ]
        lines += [f"| `{r}` | {n} | {n / max(1, self.rows_in):.1%} |" for r, n in self.reasons.most_common()]
        lines += ["", "| domain | in | kept | removed | keep rate |", "|---|---|---|---|---|"]
        for domain, n in sorted(self.domain_in.items()):
            out = self.domain_out[domain]
            lines.append(f"| {domain} | {n} | {out} | {n - out} | {out / max(1, n):.1%} |")
        if self.langs:
            lines += ["", "Kept languages: " + ", ".join(f"{lang} {n}" for lang, n in self.langs.most_common())]
        if index is not None:
            lines += ["", f"Decontamination: {len(index.hashes)} distinct {index.ngram}-grams from {index.texts} "
                      f"evaluation texts ({index.short_texts} shorter than {index.ngram} words, {index.bad_lines} unreadable lines)."]
        return "\n".join(lines) + "\n"


def filter_unit(
    unit: Unit, doc_filter: DocumentFilter, in_fs: pafs.FileSystem, out_root: str, fs: pafs.FileSystem, rows_per_batch: int
) -> dict:
    """Filter one row group into its two shards; reuse them when an earlier attempt finished."""
    docs_path = f"{out_root}/documents/{unit.name}"
    if fs.get_file_info(docs_path).type == pafs.FileType.File:
        stats = json.loads(pq.read_metadata(docs_path, filesystem=fs).metadata[STATS_KEY])
        return {**stats, "reused": 1}

    with in_fs.open_input_file(unit.path) as handle:
        reader = pq.ParquetFile(handle)
        schema = output_schema(reader.schema_arrow)
        kept = _ShardWriter(fs, docs_path, schema)
        removed = _ShardWriter(fs, f"{out_root}/rejected/{unit.name}", schema.append(REASON_FIELD))
        totals = Totals()
        for batch in reader.iter_batches(batch_size=rows_per_batch, row_groups=[unit.row_group]):
            source = pa.Table.from_batches([batch])
            annotated = doc_filter.annotate(source)
            dropped = pc.is_valid(annotated.column("reason"))
            good = annotated.filter(pc.invert(dropped)).drop_columns(["reason"])
            bad = annotated.filter(dropped)
            kept.write(good)
            if bad.num_rows:
                removed.write(bad)
            totals.count_batch(source, good, bad)
    removed.close()
    stats = dict(vars(totals))  # not dataclasses.asdict: it rebuilds Counters from (key, value) pairs
    kept.close({STATS_KEY: json.dumps(stats).encode()}, keep_empty=True)
    return stats


class UnitWorker:
    """A Ray Data actor: loads the models once, then filters the units it is handed."""

    def __init__(self, cfg: FilterConfig, index: EvalIndex | None, in_fs: pafs.FileSystem, out_root: str, fs: pafs.FileSystem):
        self.cfg, self.in_fs, self.out_root, self.fs = cfg, in_fs, out_root, fs
        self.doc_filter = cfg.document_filter(index)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        unit = Unit(row["path"], int(row["row_group"]), row["name"])
        stats = filter_unit(unit, self.doc_filter, self.in_fs, self.out_root, self.fs, self.cfg.rows_per_batch)
        return {"stats": json.dumps(stats)}


# ---------------------------------------------------------------------------------- samples


def _rejected_rows(out: StageDir, columns: list[str]) -> Iterator[dict[str, Any]]:
    selector = pafs.FileSelector(out.path("rejected"), allow_not_found=True)
    for path in sorted(i.path for i in out.fs.get_file_info(selector) if i.path.endswith(".parquet")):
        with out.fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=256, columns=columns):
                yield from batch.to_pylist()


def collect_samples(out: StageDir, per_reason: int, wanted: Counter[str]) -> list[dict[str, Any]]:
    """The first ``per_reason`` removed documents of each reason, reading ``rejected/`` in order."""
    need = {reason: min(per_reason, n) for reason, n in wanted.items()}
    taken: dict[str, list[dict[str, Any]]] = {reason: [] for reason in need}
    columns = ["id", "source", "domain", "reason", "lang", "lang_score", "toxicity", "text"]
    for row in _rejected_rows(out, columns):
        if all(len(taken[r]) >= k for r, k in need.items()):
            break
        if len(taken[row["reason"]]) < need[row["reason"]]:
            row["chars"] = len(row["text"])
            row["text"] = row["text"][:SAMPLE_CHARS]
            taken[row["reason"]].append(row)
    return [row for reason in sorted(taken) for row in taken[reason]]


def _id_index(out: StageDir) -> pa.Table:
    """Every removed document's id, reason and ``rejected/`` shard."""
    parts = [ids.append_column("shard", constant(shard, len(ids))) for shard, ids in shard_tables(out, "rejected", ["id", "reason"])]
    return pa.concat_tables(parts) if parts else ID_INDEX_SCHEMA.empty_table()


def run(ctx: StageContext) -> StageResult:
    import ray

    cfg: FilterConfig = ctx.config
    started = time.monotonic()
    index = build_index(cfg.decontamination) if cfg.decontamination else None
    for folder in ("documents", "rejected", "samples"):
        ctx.out.make(folder)
    in_fs, paths = upstream_documents(ctx.upstream["ingest"])
    units = list_units(in_fs, paths)

    totals = Totals()
    if units:
        workers = cfg.num_workers or max(1, min(len(units), int(ray.cluster_resources().get("CPU", 1))))
        stats = (
            ray.data.from_items([asdict(u) for u in units], override_num_blocks=len(units))
            .map(
                UnitWorker,
                fn_constructor_kwargs={"cfg": cfg, "index": index, "in_fs": in_fs, "out_root": ctx.out.root, "fs": ctx.out.fs},
                # one unit at a time per actor: a unit is a whole row group, and an actor that is
                # handed several while the others still load their models filters them in turn
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            )
            .iter_rows()
        )
        for row in stats:
            totals.add(json.loads(row["stats"]))
    seconds = time.monotonic() - started

    write_id_index(ctx.out, _id_index(ctx.out))
    samples = collect_samples(ctx.out, cfg.samples_per_reason, totals.reasons)
    body = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    ctx.out.write_bytes_atomic("samples/removed.jsonl", body.encode())
    ctx.log.log_text(body, "samples/removed.jsonl")
    return StageResult(
        rows=totals.rows_out, counts=totals.counts(len(units)), metrics=totals.metrics(seconds), report=totals.report(index)
    )


STAGE = Stage(name="filter", upstream=("ingest",), version="3", run=run, inputs=inputs_digest)
