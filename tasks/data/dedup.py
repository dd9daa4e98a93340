"""``dedup``: drop exact and near-duplicate documents, keeping one deterministic survivor each.

1. **Signatures** (streaming ``map_batches``, vectorized numpy): for every document, the 128-bit
   hash of its normalized text and its MinHash-LSH band keys (``tasks.data.minhash``).
2. **Exact**: documents with the same normalized-text hash are one cluster (Ray Data groupby on
   the hash).
3. **Candidates**: the exact survivors that share a band bucket become candidate pairs (Ray Data
   groupby on the band keys); the driver keeps one row per pair found in several bands.
4. **Verification**: every candidate pair gets its exact word-n-gram Jaccard (both texts are
   routed to the partition that owns the pair: one more groupby) or, with ``verify: false``, its
   MinHash estimate. Pairs at or above ``threshold`` are near-duplicates; the share of candidates
   that pass is the LSH precision, reported as ``candidate_precision``.
5. **Clusters** (driver): connected components of the near-duplicate pairs (``tasks.data.clusters``).
6. **Outputs**: ``documents/`` (survivors, schema unchanged, one shard per input shard),
   ``rejected/`` (the rest, with ``reason`` = ``exact_duplicate``/``near_duplicate`` and
   ``duplicate_of``) and ``duplicates.parquet`` (``id``, ``duplicate_of``, ``method`` =
   ``exact``/``minhash``, ``similarity``, ``kept``).

**Survivor rule.** In every cluster the longest document (characters of the raw text) is kept,
ties going to the smallest id: the most complete version survives, and the choice depends only on
the documents, never on input order or partitioning. ``duplicate_of`` names a document the removed
one was compared with and matched (``similarity`` is that pair's Jaccard; 1.0 for exact
duplicates): the exact cluster's survivor, or a near-duplicate cluster neighbour on the shortest
path to the survivor. Following ``duplicate_of`` always ends at the kept document, which ``kept``
names directly.

**How it scales.** Signatures, the exact and band groupbys and the verification are Ray Data
operations that stream or shuffle across the cluster; their memory per task is set by the number
of shuffle partitions. The driver holds what is proportional to the duplicates, not to the
corpus: the table of unique candidate pairs (ids and lengths, ~100 bytes a pair), the clustering
of the verified pairs (vectorized union-find, then a breadth-first pass for ``duplicate_of``) and
the list of removed ids broadcast to the output writers. So the limit is driver memory over
candidate pairs and duplicate ids, ~1 GB per 10 M candidate pairs; beyond that the clustering
itself would have to be distributed (iterated connected components as Ray Data joins). Buckets
larger than ``max_bucket_size`` (huge templated-page families) contribute star pairs (each member
with the bucket's best document) instead of all pairs, so pairs grow linearly with bucket size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.data.clusters import spanning_forest
from tasks.data.filter import upstream_documents
from tasks.data.id_index import GROUP_ROWS
from tasks.data.minhash import (
    MinHasher,
    candidate_probability,
    estimated_similarity,
    jaccard,
    lsh_threshold,
    normalized_words,
    shingle_hashes,
    text_hashes,
)
from tasks.stage import Stage, StageContext, StageResult
from tasks.store import StageDir

BAND_ROWS_PER_PARTITION = 4_000_000  # (band key, id) rows per shuffle partition: ~200 MB
REASONS = {"exact": "exact_duplicate", "minhash": "near_duplicate"}
DUPLICATES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("duplicate_of", pa.string()),
        ("method", pa.string()),
        ("similarity", pa.float64()),
        ("kept", pa.string()),
    ]
)
ROW_SCHEMA = pa.schema(  # band rows (key set) and exact duplicates (exact_of set), one stream
    [("part", pa.int64()), ("key", pa.uint64()), ("id", pa.string()), ("length", pa.int64()), ("exact_of", pa.string())]
)
PAIR_SCHEMA = pa.schema(  # candidate pairs (method minhash) and exact duplicates (method exact, a = survivor)
    [("a", pa.string()), ("b", pa.string()), ("a_length", pa.int64()), ("b_length", pa.int64()),
     ("bucket", pa.int64()), ("method", pa.string())]
)
CANDIDATE_SCHEMA = pa.schema(  # unique candidate pairs: shared bands, largest bucket, similarity
    [("a", pa.string()), ("b", pa.string()), ("a_length", pa.int64()), ("b_length", pa.int64()),
     ("bands", pa.int64()), ("bucket", pa.int64()), ("similarity", pa.float64())]
)
EXACT_SCHEMA = pa.schema([("id", pa.string()), ("exact_of", pa.string())])
SIMILARITY_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("similarity", pa.float64())])
SIMILARITY_BINS = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)


class DedupConfig(BaseModel):
    """Exact and MinHash-LSH near-duplicate removal.

    The defaults aim at near-duplicates of word-5-gram Jaccard >= 0.8. LSH declares two documents
    candidates when they agree on all ``rows`` minima of at least one of ``bands`` bands, which
    happens with probability ``1 - (1 - s^rows)^bands`` for Jaccard ``s`` (the S-curve). With
    exact verification on, the curve only has to let every true pair through, and verification
    removes the rest: 20 bands x 5 rows puts the curve's midpoint at (1/20)^(1/5) ~ 0.55 and
    catches a pair at s = 0.8 with probability 0.9997 (0.996 at 0.75), while a pair at 0.5 becomes
    a candidate 47% of the time and one at 0.3 only 5% of the time, so candidates stay few. (The
    common 14 x 8 = 112 choice centres the curve at 0.72 and only catches a 0.8 pair with
    probability 0.92.) Without verification, candidates are accepted on their MinHash estimate
    (standard error ~0.04 at 0.8 with 100 permutations), so pairs near the threshold go either way.
    """

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="remove documents whose normalized text equals another's")
    fuzzy: bool = Field(True, description="remove near-duplicates found with MinHash-LSH")
    ngram: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(100, ge=1, description="MinHash permutations (signature length)")
    bands: int = Field(20, ge=1, description="LSH bands")
    rows: int = Field(5, ge=1, description="signature rows per band (bands x rows <= num_perm)")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard at or above which two documents are near-duplicates")
    verify: bool = Field(True, description="check candidate pairs with exact Jaccard (else: MinHash estimate)")
    max_bucket_size: int = Field(
        64, ge=2, description="buckets with more documents yield star pairs (member, best document) instead of all pairs"
    )
    seed: int = Field(42, description="seed of the MinHash permutations")
    batch_size: int = Field(1024, ge=1, description="documents per signature batch")
    shuffle_partitions: int | None = Field(
        None, ge=1, description="groups each groupby splits its rows into (its parallelism and memory per task); "
        "default: the cluster's CPUs, more for corpora over 200k documents",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DedupConfig:
        if not (self.exact or self.fuzzy):
            raise ValueError("enable at least one of exact, fuzzy")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self

    @property
    def hasher(self) -> MinHasher:
        return MinHasher(ngram=self.ngram, num_perm=self.num_perm, seed=self.seed)


# ------------------------------------------------------------------------- per-batch functions
# Module-level and pure, so Ray ships them to workers as they are and tests call them directly.


def survivor_order(table: pa.Table, *first: tuple[str, str]) -> pa.Table:
    """Rows sorted by the given keys, then longest ``length`` first, then smallest ``id``."""
    return table.take(pc.sort_indices(table, sort_keys=[*first, ("length", "descending"), ("id", "ascending")]))


def read_row_groups(units: pa.Table, fs: Any, columns: list[str]) -> pa.Table:
    """``columns`` of the Parquet row groups listed in ``units`` (``path``, ``row_group``)."""
    tables = []
    for path, group in zip(units["path"].to_pylist(), units["row_group"].to_pylist()):
        with fs.open_input_file(path) as handle:
            tables.append(pq.ParquetFile(handle).read_row_group(group, columns=columns))
    return pa.concat_tables(tables)


def signature_batch(batch: pa.Table, hasher: MinHasher, bands: int, rows: int, partitions: int) -> pa.Table:
    """Per document: id, text length, normalized-text hash (+ its partition) and LSH band keys.

    ``bands = 0`` skips MinHash (exact dedup only).
    """
    words = normalized_words(batch["text"])
    high, low = text_hashes(words)
    columns = {
        "id": batch["id"],
        "length": pc.cast(pc.utf8_length(batch["text"]), pa.int64()),
        "text_high": high,
        "text_low": low,
        "part": (high % np.uint64(partitions)).astype(np.int64),
    }
    if bands:
        values, offsets = shingle_hashes(words, hasher.ngram)
        keys = hasher.band_keys(hasher.signatures(values, offsets), bands, rows)
        columns["shingled"] = offsets[1:] > offsets[:-1]
        columns["band_keys"] = pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel()), bands)
    return pa.table(columns)


def band_rows(batch: pa.Table, partitions: int) -> pa.Table:
    """One ``ROW_SCHEMA`` row per (document, band) for the documents that have shingles."""
    batch = batch.filter(batch["shingled"])
    bands = batch.schema.field("band_keys").type.list_size
    keys = pc.list_flatten(batch["band_keys"]).to_numpy()
    owner = np.repeat(np.arange(len(batch)), bands)
    return pa.table({
        "part": (keys % np.uint64(partitions)).astype(np.int64),
        "key": keys,
        "id": batch["id"].take(owner),
        "length": batch["length"].take(owner),
        "exact_of": pa.nulls(len(owner), pa.string()),
    }, schema=ROW_SCHEMA)


def exact_clusters(group: pa.Table, partitions: int, fuzzy: bool) -> pa.Table:
    """Documents with equal normalized text: one ``ROW_SCHEMA`` row per exact duplicate
    (``exact_of`` = its cluster's survivor), then, if ``fuzzy``, the survivors' band rows.

    One stream carries both kinds of rows so the corpus is read and shuffled only once.
    """
    group = survivor_order(group, ("text_high", "ascending"), ("text_low", "ascending"))
    high, low = group["text_high"].to_numpy(), group["text_low"].to_numpy()
    starts = np.ones(len(group), dtype=bool)
    starts[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
    first = np.maximum.accumulate(np.where(starts, np.arange(len(group)), 0))
    duplicate = np.flatnonzero(~starts)
    exact = pa.table({
        "part": group["part"].take(duplicate),
        "key": pa.nulls(len(duplicate), pa.uint64()),
        "id": group["id"].take(duplicate),
        "length": group["length"].take(duplicate),
        "exact_of": group["id"].take(first[duplicate]),
    }, schema=ROW_SCHEMA)
    if not fuzzy:
        return exact
    return pa.concat_tables([exact, band_rows(group.filter(pa.array(starts)), partitions)])


def bucket_pairs(group: pa.Table, max_bucket_size: int) -> pa.Table:
    """``PAIR_SCHEMA`` rows: the candidate pairs of the buckets (equal band keys) in ``group``,
    best document first, and the exact duplicates passed through (``a`` = survivor).

    One call handles a whole hash partition of band keys rather than one bucket, so the work is
    a few vectorized passes instead of a Python call per bucket (most buckets hold one document).
    Pairs found in several bands repeat; the driver keeps one of each.
    """
    exact = group.filter(pc.is_valid(group["exact_of"]))
    passed = pa.table({
        "a": exact["exact_of"], "b": exact["id"],
        "a_length": pa.nulls(len(exact), pa.int64()), "b_length": exact["length"],
        "bucket": pa.nulls(len(exact), pa.int64()), "method": pa.array(["exact"] * len(exact), pa.string()),
    }, schema=PAIR_SCHEMA)
    group = survivor_order(group.filter(pc.is_null(group["exact_of"])), ("key", "ascending"))
    keys = group["key"].to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, np.int64)
    sizes = np.diff(np.append(starts, len(keys)))
    left, right, bucket = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for size in np.unique(sizes[sizes > 1]):
        first = starts[sizes == size]
        if size <= max_bucket_size:
            i, j = np.triu_indices(size, 1)
        else:  # star: every member with the bucket's best document
            i, j = np.zeros(size - 1, dtype=np.int64), np.arange(1, size)
        left.append((first[:, None] + i).ravel())
        right.append((first[:, None] + j).ravel())
        bucket.append(np.full(len(first) * len(i), size))
    a, b = np.concatenate(left), np.concatenate(right)
    pairs = pa.table({
        "a": group["id"].take(a), "b": group["id"].take(b),
        "a_length": group["length"].take(a), "b_length": group["length"].take(b),
        "bucket": np.concatenate(bucket), "method": pa.array(["minhash"] * len(a), pa.string()),
    }, schema=PAIR_SCHEMA)
    return pa.concat_tables([passed, pairs])


def route_documents(batch: pa.Table, owners: pa.Table, hasher: MinHasher, verify: bool) -> pa.Table:
    """Send every document that is in a candidate pair to each partition that scores one of its
    pairs (``owners``: id -> part), with its text, or (``verify`` off) its MinHash signature."""
    routed = batch.select(["id", "text"]).join(owners, keys="id", join_type="inner")
    if verify:
        return routed.select(["part", "id", "text"])
    values, offsets = shingle_hashes(normalized_words(routed["text"]), hasher.ngram)
    signatures = hasher.signatures(values, offsets)
    return pa.table({
        "part": routed["part"], "id": routed["id"],
        "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), hasher.num_perm),
    })


def score_pairs(group: pa.Table, pairs: dict[int, pa.Table], ngram: int) -> pa.Table:
    """Similarity of the candidate pairs a partition owns, from its routed documents: exact
    Jaccard of the texts' word n-grams, or the share of equal signature entries."""
    owned = pairs[group["part"][0].as_py()]
    a = pc.index_in(owned["a"], value_set=group["id"]).to_numpy()
    b = pc.index_in(owned["b"], value_set=group["id"]).to_numpy()
    if "signature" in group.column_names:
        signatures = pc.list_flatten(group["signature"]).to_numpy().reshape(len(group), -1)
        similarity = estimated_similarity(signatures[a], signatures[b])
    else:
        values, offsets = shingle_hashes(normalized_words(group["text"]), ngram)
        sets = [np.unique(values[offsets[k] : offsets[k + 1]]) for k in range(len(group))]
        similarity = np.array([jaccard(sets[i], sets[j]) for i, j in zip(a, b)], dtype=np.float64)
    return pa.table({"a": owned["a"], "b": owned["b"], "similarity": pa.array(similarity, pa.float64())})


def split_batch(batch: pa.Table, removed: pa.Table, keep: bool) -> pa.Table:
    """Survivors unchanged (``keep``), or the removed rows with ``reason`` and ``duplicate_of``."""
    where = pc.index_in(batch["id"], value_set=removed["id"])
    if keep:
        return batch.filter(pc.is_null(where))
    hit = pc.is_valid(where)
    rows, where = batch.filter(hit), where.filter(hit)
    return rows.append_column("reason", pc.take(removed["reason"], where)).append_column(
        "duplicate_of", pc.take(removed["duplicate_of"], where)
    )


def shard_name(path: str) -> str:
    """Output name of an input shard: its path below ``documents/`` (or its file name), flattened."""
    below = path.rsplit("/documents/", 1)[-1] if "/documents/" in path else path.rsplit("/", 1)[-1]
    return below.replace("/", "--")


def split_shard(shard: dict[str, str], removed: pa.Table, in_fs: Any, out_root: str, fs: Any) -> dict[str, int]:
    """Stream one input shard into ``documents/{name}`` (survivors) and ``rejected/{name}`` (duplicates).

    Each file is written under a temporary name and renamed when complete; a shard without
    duplicates gets no ``rejected/`` file.
    """
    counts = {"kept": 0, "removed": 0}
    writers: dict[str, pq.ParquetWriter] = {}
    with in_fs.open_input_file(shard["path"]) as handle:
        reader = pq.ParquetFile(handle)
        for batch in reader.iter_batches(batch_size=8192):
            table = pa.Table.from_batches([batch], reader.schema_arrow)
            for folder, keep in (("documents", True), ("rejected", False)):
                part = split_batch(table, removed, keep)
                if part.num_rows:
                    if folder not in writers:
                        writers[folder] = pq.ParquetWriter(f"{out_root}/{folder}/{shard['name']}.partial", part.schema, filesystem=fs)
                    writers[folder].write_table(part)
                    counts["kept" if keep else "removed"] += part.num_rows
        if "documents" not in writers:  # every input shard has its (possibly empty) output shard
            writers["documents"] = pq.ParquetWriter(f"{out_root}/documents/{shard['name']}.partial", reader.schema_arrow, filesystem=fs)
    for folder, writer in writers.items():
        writer.close()
        fs.move(f"{out_root}/{folder}/{shard['name']}.partial", f"{out_root}/{folder}/{shard['name']}")
    return counts


# ------------------------------------------------------------------------------ driver side


def near_duplicates(edges: pa.Table) -> pa.Table:
    """Cluster verified pairs (``a``, ``b``, ``a_length``, ``b_length``, ``similarity``).

    Returns one row per removed document: ``id``, ``duplicate_of`` (its link towards the
    survivor), ``similarity`` (of that pair) and ``kept`` (the cluster's survivor).
    """
    nodes = pa.concat_tables([
        edges.select(["a", "a_length"]).rename_columns(["id", "length"]),
        edges.select(["b", "b_length"]).rename_columns(["id", "length"]),
    ]).group_by(["id", "length"]).aggregate([])
    ids = survivor_order(nodes)["id"].combine_chunks()
    forest = spanning_forest(
        len(ids),
        pc.index_in(edges["a"], value_set=ids).to_numpy(),
        pc.index_in(edges["b"], value_set=ids).to_numpy(),
        edges["similarity"].to_numpy(),
    )
    removed = np.flatnonzero(forest.parent >= 0)
    return pa.table({
        "id": ids.take(removed),
        "duplicate_of": ids.take(forest.parent[removed]),
        "similarity": forest.weight[removed],
        "kept": ids.take(forest.root[removed]),
    })


def duplicates_table(exact: pa.Table, near: pa.Table) -> pa.Table:
    """``duplicates.parquet``: exact rows (``id``, ``exact_of``) and near rows, sorted by id.

    An exact duplicate whose survivor was then removed as a near-duplicate keeps pointing at its
    exact twin; its ``kept`` is the near-duplicate cluster's survivor.
    """
    twin_gone = pc.index_in(exact["exact_of"], value_set=near["id"])
    kept = pc.coalesce(pc.take(near["kept"], twin_gone), exact["exact_of"])
    exact_rows = pa.table({
        "id": exact["id"],
        "duplicate_of": exact["exact_of"],
        "method": pa.array(["exact"] * len(exact), pa.string()),
        "similarity": pa.array(np.ones(len(exact)), pa.float64()),
        "kept": kept,
    })
    near_rows = near.append_column("method", pa.array(["minhash"] * len(near), pa.string()))
    both = pa.concat_tables([exact_rows.cast(DUPLICATES_SCHEMA), near_rows.select(DUPLICATES_SCHEMA.names).cast(DUPLICATES_SCHEMA)])
    return both.sort_by("id")


# ------------------------------------------------------------------------------- the Ray job


def unique_pairs(chunks: Iterable[pa.Table], compact_rows: int = 1_000_000) -> pa.Table:
    """One row per candidate pair (``a``, ``b``) with ``bands`` (how many bands found it) and the
    largest ``bucket`` it came from. Compacts as chunks arrive, so memory follows the unique pairs
    rather than their repeats across bands."""
    keys = ["a", "b", "a_length", "b_length"]
    unique = CANDIDATE_SCHEMA.empty_table().drop_columns(["similarity"])
    pending: list[pa.Table] = []

    def compact() -> pa.Table:
        merged = pa.concat_tables([unique, *pending]).group_by(keys).aggregate([("bands", "sum"), ("bucket", "max")])
        return merged.rename_columns([*keys, "bands", "bucket"]).select(unique.column_names)

    for chunk in chunks:
        pending.append(chunk.select(["a", "b", "a_length", "b_length", "bucket"]).append_column(
            "bands", pa.array(np.ones(len(chunk), dtype=np.int64))).select(unique.column_names))
        if sum(len(p) for p in pending) > compact_rows + len(unique):
            unique, pending = compact(), []
    unique = compact()
    return unique.take(pc.sort_indices(unique, sort_keys=[("a", "ascending"), ("b", "ascending")]))


class _Timer:
    """Seconds spent in each phase (Ray is lazy: a phase ends where its result is pulled)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = now - self._last
        self._last = now


class Deduplicator:
    """One dedup run over Parquet document shards; ``run`` writes the outputs and returns the result.

    Three Ray Data jobs: (1) signatures -> exact groupby -> band groupby, streamed to the driver
    as exact duplicates and candidate pairs; (2) candidate documents routed to the partitions
    that own their pairs (a broadcast hash join in one groupby) and scored; (3) one task per input
    shard writing its survivors and duplicates.
    """

    def __init__(self, cfg: DedupConfig, fs: Any, paths: list[str], out: StageDir):
        self.cfg, self.fs, self.paths, self.out = cfg, fs, sorted(paths), out
        self.timer = _Timer()
        footers = [pq.read_metadata(path, filesystem=fs) for path in self.paths]
        self.rows_in = sum(footer.num_rows for footer in footers)
        self.row_groups = [
            {"path": path, "row_group": group}
            for path, footer in zip(self.paths, footers) for group in range(footer.num_row_groups)
        ]

    def read(self, columns: list[str]) -> Any:
        """``columns`` of the input, one task per Parquet row group, as a dataset whose groupbys
        use the sort-based (pull) shuffle.

        Sort-based shuffles run as plain tasks on Ray's warm worker pool; the hash shuffle starts a
        pool of aggregator actors (fresh processes) for every groupby, and ``read_parquet`` its own
        listing and metadata tasks, which together cost more than the dedup work on small and
        medium runs.
        """
        import ray
        from ray.data.context import ShuffleStrategy

        ds = ray.data.from_items(self.row_groups, override_num_blocks=len(self.row_groups)).map_batches(
            read_row_groups, batch_size=1, batch_format="pyarrow", fn_kwargs={"fs": self.fs, "columns": columns}
        )
        ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        return ds

    def partitions(self, rows: int) -> int:
        import ray

        if self.cfg.shuffle_partitions:
            return self.cfg.shuffle_partitions
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(cpus, math.ceil(rows * self.cfg.bands / BAND_ROWS_PER_PARTITION))

    def candidates(self, parts: int) -> tuple[pa.Table, pa.Table]:
        """Exact duplicates (``id``, ``exact_of``) and the unique candidate pairs."""
        cfg = self.cfg
        records = self.read(["id", "text"]).map_batches(
            signature_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
            fn_kwargs={"hasher": cfg.hasher, "bands": cfg.bands if cfg.fuzzy else 0, "rows": cfg.rows, "partitions": parts},
        )
        if cfg.exact:
            rows = records.groupby("part", num_partitions=parts).map_groups(
                exact_clusters, batch_format="pyarrow", fn_kwargs={"partitions": parts, "fuzzy": cfg.fuzzy}
            )
        else:
            rows = records.map_batches(band_rows, batch_format="pyarrow", fn_kwargs={"partitions": parts})
        pair_kwargs = {"max_bucket_size": cfg.max_bucket_size}
        if cfg.fuzzy:
            pairs = rows.groupby("part", num_partitions=parts).map_groups(bucket_pairs, batch_format="pyarrow", fn_kwargs=pair_kwargs)
        else:
            pairs = rows.map_batches(bucket_pairs, batch_format="pyarrow", fn_kwargs=pair_kwargs)
        exact: list[pa.Table] = []

        def minhash_chunks() -> Iterable[pa.Table]:
            for block in pairs.iter_batches(batch_size=None, batch_format="pyarrow"):
                is_exact = pc.equal(block["method"], "exact")
                exact.append(block.filter(is_exact).select(["b", "a"]).rename_columns(["id", "exact_of"]))
                yield block.filter(pc.invert(is_exact))

        candidates = unique_pairs(minhash_chunks())
        exact_table = pa.concat_tables([EXACT_SCHEMA.empty_table(), *exact])
        self.timer.lap("signatures_exact_candidates")
        return exact_table, candidates

    def score(self, candidates: pa.Table, parts: int) -> pa.Table:
        """``candidates`` with a ``similarity`` column (exact Jaccard, or the MinHash estimate).

        Each pair is owned by a partition chosen from its first document; both documents are sent
        there (``route_documents``), so one groupby brings every pair's two texts together.
        """
        cfg = self.cfg
        ids = pc.unique(pa.concat_arrays([candidates["a"].combine_chunks(), candidates["b"].combine_chunks()]))
        ids = ids.take(pc.sort_indices(ids))
        part = pa.array(pc.index_in(candidates["a"], value_set=ids).to_numpy() % parts)
        owners = pa.concat_tables([
            pa.table({"id": candidates["a"], "part": part}), pa.table({"id": candidates["b"], "part": part}),
        ]).group_by(["id", "part"]).aggregate([])
        owned = candidates.select(["a", "b"]).append_column("part", part)
        by_part = {p: owned.filter(pc.equal(owned["part"], p)).select(["a", "b"]) for p in np.unique(part.to_numpy())}
        scored = (
            self.read(["id", "text"])
            .map_batches(route_documents, batch_format="pyarrow", fn_kwargs={"owners": owners, "hasher": cfg.hasher, "verify": cfg.verify})
            .groupby("part", num_partitions=parts)
            .map_groups(score_pairs, batch_format="pyarrow", fn_kwargs={"pairs": by_part, "ngram": cfg.ngram})
        )
        similarity = pa.concat_tables(
            [SIMILARITY_SCHEMA.empty_table(), *scored.iter_batches(batch_size=None, batch_format="pyarrow")]
        )
        self.timer.lap("verification" if cfg.verify else "estimation")
        joined = candidates.join(similarity, keys=["a", "b"], join_type="inner")
        return joined.select(CANDIDATE_SCHEMA.names).take(pc.sort_indices(joined, sort_keys=[("a", "ascending"), ("b", "ascending")]))

    def write(self, duplicates: pa.Table) -> int:
        """duplicates.parquet, then one Ray task per input shard for documents/ and rejected/;
        returns the number of documents kept."""
        import ray

        # sorted by id in small row groups: a lookup by id (``crucible trace``) reads one of them
        pq.write_table(duplicates, self.out.path("duplicates.parquet"), filesystem=self.out.fs, row_group_size=GROUP_ROWS)
        if not self.paths:
            return 0
        reason = pc.if_else(pc.equal(duplicates["method"], "exact"), REASONS["exact"], REASONS["minhash"])
        removed = duplicates.select(["id", "duplicate_of"]).append_column("reason", reason)
        shards = [{"path": p, "name": shard_name(p)} for p in self.paths]
        written = ray.data.from_items(shards, override_num_blocks=len(shards)).map(
            split_shard, fn_kwargs={"removed": removed, "in_fs": self.fs, "out_root": self.out.root, "fs": self.out.fs}
        ).take_all()
        self.timer.lap("write")
        return sum(row["kept"] for row in written)

    def run(self) -> StageResult:
        cfg = self.cfg
        rows_in = self.rows_in
        exact = EXACT_SCHEMA.empty_table()
        candidates = CANDIDATE_SCHEMA.empty_table()
        if self.row_groups:
            parts = self.partitions(rows_in)
            exact, pairs = self.candidates(parts)
            if len(pairs):
                candidates = self.score(pairs, parts)
        near = near_duplicates(candidates.filter(pc.greater_equal(candidates["similarity"], cfg.threshold)))
        self.timer.lap("clustering")
        duplicates = duplicates_table(exact, near)
        rows_out = self.write(duplicates)
        return summarize(cfg, rows_in, rows_out, duplicates, candidates, self.timer.seconds)


# ---------------------------------------------------------------------------------- summary


def summarize(
    cfg: DedupConfig, rows_in: int, rows_out: int, duplicates: pa.Table, scored: pa.Table, seconds: dict[str, float]
) -> StageResult:
    """Counts, metrics and the markdown report of one run."""
    method = duplicates["method"]
    exact, near = duplicates.filter(pc.equal(method, "exact")), duplicates.filter(pc.equal(method, "minhash"))
    similarity = scored["similarity"].to_numpy()
    verified = int((similarity >= cfg.threshold).sum())
    counts = {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "exact_duplicates": len(exact),
        "exact_clusters": len(pc.unique(exact["duplicate_of"])),
        "near_duplicates": len(near),
        "near_clusters": len(pc.unique(near["kept"])),
        "near_linked_via_member": int(pc.sum(pc.not_equal(near["duplicate_of"], near["kept"])).as_py() or 0),
        "candidate_pairs": len(scored),
        "verified_pairs": verified,
        "large_bucket_pairs": int((scored["bucket"].to_numpy() > cfg.max_bucket_size).sum()),
    }
    metrics = {
        "duplicate_rate": len(duplicates) / max(1, rows_in),
        "lsh_candidate_probability_at_threshold": float(candidate_probability(cfg.threshold, cfg.bands, cfg.rows)),
        "lsh_threshold": lsh_threshold(cfg.bands, cfg.rows),
        **{f"seconds.{phase}": s for phase, s in seconds.items()},
    }
    if len(scored):
        metrics["candidate_precision"] = verified / len(scored)
    return StageResult(rows=rows_out, counts=counts, metrics=metrics, report=_report(cfg, counts, metrics, similarity))


def _report(cfg: DedupConfig, counts: dict[str, int], metrics: dict[str, float], similarity: np.ndarray) -> str:
    rows_in, removed = counts["rows_in"], counts["rows_in"] - counts["rows_out"]
    how = "exact Jaccard" if cfg.verify else "MinHash estimate"
    lines = [
        f"Kept **{counts['rows_out']}** of {rows_in} documents; removed **{removed}** ({removed / max(1, rows_in):.1%}): "
        f"{counts['exact_duplicates']} exact duplicates in {counts['exact_clusters']} clusters, "
        f"{counts['near_duplicates']} near-duplicates (word-{cfg.ngram}-gram Jaccard >= {cfg.threshold}, {how}) "
        f"in {counts['near_clusters']} clusters. See `duplicates.parquet` and `rejected/`.",
        "",
        f"LSH: {cfg.bands} bands x {cfg.rows} rows of {cfg.num_perm} permutations; S-curve midpoint "
        f"{metrics['lsh_threshold']:.2f}, P(candidate | Jaccard = {cfg.threshold}) = "
        f"{metrics['lsh_candidate_probability_at_threshold']:.4f}.",
    ]
    if counts["candidate_pairs"]:
        lines += [
            f"Candidate pairs: {counts['candidate_pairs']}, of which {counts['verified_pairs']} "
            f"({metrics['candidate_precision']:.1%}) reach the threshold"
            + (f"; {counts['large_bucket_pairs']} came from buckets over {cfg.max_bucket_size} documents." if counts["large_bucket_pairs"] else "."),
            "",
            "| candidate similarity | pairs |",
            "|---|---|",
        ]
        histogram, _ = np.histogram(similarity, bins=SIMILARITY_BINS)
        lines += [f"| [{lo}, {hi}{']' if hi == 1.0 else ')'} | {n} |" for lo, hi, n in zip(SIMILARITY_BINS, SIMILARITY_BINS[1:], histogram)]
    timings = ", ".join(f"{k.removeprefix('seconds.')} {v:.1f}s" for k, v in metrics.items() if k.startswith("seconds."))
    if timings:
        lines += ["", f"Time: {timings}."]
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> StageResult:
    (manifest,) = ctx.upstream.values()
    fs, paths = upstream_documents(manifest)
    for folder in ("documents", "rejected"):
        ctx.out.make(folder)
    return Deduplicator(ctx.config, fs, paths, ctx.out).run()


STAGE = Stage(name="dedup", upstream=("filter",), version="1", run=run)
