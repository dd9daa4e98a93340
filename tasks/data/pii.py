"""``pii``: replace e-mails, phones, public IPs, cards, SSNs, IBANs and secrets with placeholders.

A streaming Ray Data job: ``read_parquet`` over the upstream documents, then ``map_batches``
where each batch is redacted (:mod:`tasks.data.pii_detect`) and written as its own Parquet
shard, named after a hash of the batch's ids. Each document gains one count column per kind
(``pii_email``, ``pii_phone`` …). Documents with more than ``max_hits`` hits go to
``rejected/`` with reason ``pii_excess`` — redacted too, so the audit trail is no PII store.

Resume: a shard that an earlier attempt finished is reused (its stats live in the Parquet
metadata); shards left by an attempt that batched differently are removed at the end, so the
output always holds every document exactly once.

Last, the driver writes ``ids/`` (``tasks/data/id_index.py``): the id, shard, reason (null when
kept) and per-kind counts of every document that had PII or was rejected, which ``crucible
trace`` looks documents up in (a document that reached this stage and is not there was kept as it
was).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any

import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.data.id_index import constant, shard_tables, write_id_index
from tasks.data.pii_detect import ALL_KINDS, PiiKind, RedactOptions, redact
from tasks.stage import Stage, StageContext, StageResult
from tasks.store import StageDir

REJECT_REASON = "pii_excess"
_STATS_KEY = b"crucible.pii_stats"


class PiiConfig(BaseModel):
    """Which PII to replace, and when a document has too much of it to keep."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(ALL_KINDS),
        min_length=1,
        description="kinds to replace: email, phone, ip_address, credit_card, ssn, iban, secret",
    )
    public_ips_only: bool = Field(
        True, description="replace only public IPs; private, loopback, link-local, reserved and documentation ranges stay"
    )
    phone_region: str = Field(
        "US", description="region for phone numbers written without a +country code (ISO 3166 alpha-2)"
    )
    max_hits: int | None = Field(
        None, ge=0, description="documents with more hits than this go to rejected/ (reason pii_excess); null keeps all"
    )
    batch_size: int = Field(512, ge=1, description="documents per batch, and so per output shard")

    @field_validator("kinds")
    @classmethod
    def _no_repeats(cls, kinds: list[PiiKind]) -> list[PiiKind]:
        return list(dict.fromkeys(kinds))

    @field_validator("phone_region")
    @classmethod
    def _known_region(cls, region: str) -> str:
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region '{region}' (use an ISO 3166 alpha-2 code such as US, GB, DE)")
        return region

    def options(self) -> RedactOptions:
        return RedactOptions(frozenset(self.kinds), self.public_ips_only, self.phone_region)


def count_column(kind: PiiKind) -> str:
    return f"pii_{kind.value}"


# ---------------------------------------------------------------------------------- one batch


def _batch_stats(counts: list[Counter], changed: list[bool], rejected: int, kinds: list[PiiKind]) -> dict[str, int]:
    stats = {"documents": len(counts), "changed": sum(changed), "rejected": rejected}
    for kind in kinds:
        stats[f"hits.{kind.value}"] = sum(c[kind] for c in counts)
        stats[f"docs.{kind.value}"] = sum(1 for c in counts if c[kind])
    return stats


def _write_atomic(table: pa.Table, fs: pafs.FileSystem, path: str, metadata: dict[bytes, bytes] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = f"{path}.partial"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def redact_batch(batch: pa.Table, cfg: PiiConfig, out_root: str, fs: pafs.FileSystem) -> pa.Table:
    """Redact one batch, write its shard(s), return one row of stats (with the shard's name)."""
    ids = batch.column("id").to_pylist()
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
    shard = f"part-{digest}.parquet"  # named by its ids, so a retried batch rewrites the same file
    docs_path = f"{out_root}/documents/{shard}"
    if fs.get_file_info(docs_path).type == pafs.FileType.File:  # finished by an earlier attempt
        stats = json.loads(pq.read_schema(docs_path, filesystem=fs).metadata[_STATS_KEY])
        return pa.Table.from_pylist([{"shard": shard, "reused": 1, **stats}])

    options = cfg.options()
    texts = batch.column("text").to_pylist()
    results = [redact(t, options) if t else None for t in texts]
    counts = [r.counts if r else Counter() for r in results]
    changed = [bool(r and r.total) for r in results]
    out = batch.set_column(
        batch.schema.get_field_index("text"), "text", pa.array([r.text if r else t for r, t in zip(results, texts)], pa.string())
    )
    for kind in cfg.kinds:
        out = out.append_column(count_column(kind), pa.array([c[kind] for c in counts], pa.int32()))

    if cfg.max_hits is not None:
        excess = pa.array([sum(c.values()) > cfg.max_hits for c in counts])
        rejected = out.filter(excess)
        out = out.filter(pc.invert(excess))
        if rejected.num_rows:
            reasons = pa.array([REJECT_REASON] * rejected.num_rows, pa.string())
            _write_atomic(rejected.append_column("reason", reasons), fs, f"{out_root}/rejected/{shard}")
    stats = _batch_stats(counts, changed, len(ids) - out.num_rows, cfg.kinds)
    _write_atomic(out, fs, docs_path, {_STATS_KEY: json.dumps(stats).encode()})  # last: marks the shard done
    return pa.Table.from_pylist([{"shard": shard, "reused": 0, **stats}])


# ---------------------------------------------------------------------------------- the stage


def _remove_stale_shards(fs: pafs.FileSystem, out_root: str, keep: set[str]) -> int:
    """Delete shards an earlier, differently batched attempt left behind; return how many."""
    removed = 0
    for folder in ("documents", "rejected"):
        selector = pafs.FileSelector(f"{out_root}/{folder}", allow_not_found=True)
        for info in fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name not in keep:
                fs.delete_file(info.path)
                removed += 1
    return removed


def _report(totals: dict[str, int], kinds: list[PiiKind], cfg: PiiConfig) -> str:
    rows = "\n".join(
        f"| {kind.value} | `{kind.placeholder}` | {totals[f'hits.{kind.value}']} | {totals[f'docs.{kind.value}']} |"
        for kind in kinds
    )
    dropped = (
        f"; **{totals['rejected']}** with more than {cfg.max_hits} hits went to `rejected/` (reason `{REJECT_REASON}`)"
        if cfg.max_hits is not None
        else ""
    )
    return (
        f"Scanned **{totals['documents']}** documents; **{totals['changed']}** had PII replaced{dropped}.\n\n"
        f"| kind | placeholder | hits | documents |\n|---|---|---|---|\n{rows}\n\n"
        f"Public IPs only: {cfg.public_ips_only}; phone region for national numbers: {cfg.phone_region}.\n"
    )


def _id_index(out: StageDir, kinds: list[PiiKind]) -> pa.Table:
    """Id, shard, reason and counts of the documents that had PII replaced or were rejected."""
    counts = [count_column(kind) for kind in kinds]
    schema = pa.schema(
        [("id", pa.string()), ("shard", pa.dictionary(pa.int32(), pa.string())), ("reason", pa.string())]
        + [(c, pa.int32()) for c in counts]
    )
    parts = [schema.empty_table()]
    for folder, extra in (("documents", []), ("rejected", ["reason"])):
        for shard, rows in shard_tables(out, folder, ["id", *counts, *extra]):
            if not extra:
                rows = rows.append_column("reason", pa.nulls(len(rows), pa.string()))
            changed = pc.or_(pc.is_valid(rows["reason"]), pc.greater(pc.max_element_wise(*(rows[c] for c in counts)), 0))
            rows = rows.filter(changed)
            parts.append(rows.append_column("shard", constant(shard, len(rows))).select(schema.names).cast(schema))
    return pa.concat_tables(parts)


def run(ctx: StageContext) -> StageResult:
    import ray

    cfg: PiiConfig = ctx.config
    (upstream,) = ctx.upstream.values()
    in_fs, files = upstream.files_in("documents")
    out_root, fs = ctx.out.root, ctx.out.fs
    ctx.out.make("documents")
    if cfg.max_hits is not None:
        ctx.out.make("rejected")

    started = time.monotonic()
    per_batch: list[dict[str, Any]] = []
    if files:
        per_batch = (
            ray.data.read_parquet(files, filesystem=in_fs)
            .map_batches(
                redact_batch,
                batch_size=cfg.batch_size,
                batch_format="pyarrow",
                fn_kwargs={"cfg": cfg, "out_root": out_root, "fs": fs},
            )
            .take_all()
        )
    seconds = time.monotonic() - started
    stale = _remove_stale_shards(fs, out_root, {row["shard"] for row in per_batch})
    write_id_index(ctx.out, _id_index(ctx.out, cfg.kinds))

    totals: Counter[str] = Counter()
    for row in per_batch:
        totals.update({k: v for k, v in row.items() if k != "shard"})
    documents, kept = totals["documents"], totals["documents"] - totals["rejected"]
    hits = sum(totals[f"hits.{kind.value}"] for kind in cfg.kinds)
    counts = {
        "rows_in": documents,
        "documents_changed": totals["changed"],
        f"removed.{REJECT_REASON}": totals["rejected"],
        "reused_shards": totals["reused"],
        "stale_shards_removed": stale,
        "pii_hits": hits,
        **{f"pii.{kind.value}": totals[f"hits.{kind.value}"] for kind in cfg.kinds},
    }
    metrics = {
        "changed_rate": totals["changed"] / max(1, documents),
        "rejected_rate": totals["rejected"] / max(1, documents),
        "hits_per_document": hits / max(1, documents),
        "documents_per_s": documents / max(seconds, 1e-9),
    }
    return StageResult(rows=kept, counts=counts, metrics=metrics, report=_report(totals, cfg.kinds, cfg))


STAGE = Stage(name="pii", upstream=("dedup",), version="3", run=run)
