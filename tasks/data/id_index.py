"""Id indexes: a document's row among a stage's outputs, found by reading one small file.

A stage's outputs are sharded by how they were made (per input file, per row group, per batch),
so a document can be in any shard, and finding one by id would read the id column of every shard.
A stage that ``crucible trace`` asks about also writes an id index: one row per document it
indexes (the id and a few small columns: a shard, a reason, counts, token offsets), hashed on the
id into ``ids/NNNNN.parquet`` buckets of at most ``ROWS_PER_BUCKET`` rows, each sorted by id in
row groups of ``GROUP_ROWS``. A lookup hashes the id, opens that bucket and reads the one row
group whose id range can hold it (predicate pushdown on the row groups' min/max statistics). The
number of buckets is the number of bucket files the manifest lists, so nothing else records it.

The stage's driver writes the index and holds its rows meanwhile (tens of bytes a row besides the
id: about 1 GB per 10 M rows), the same order as what ``dedup``'s driver holds; it reads the
outputs' small columns only, never their text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from io import BytesIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tasks.data.tokenizer import id_hashes
from tasks.errors import StageError
from tasks.stage import Manifest
from tasks.store import StageDir, filesystem_for, join_uri

IDS = "ids"
ROWS_PER_BUCKET = 250_000
GROUP_ROWS = 8192
SALT = "id-index"


def bucket_of(ids: Sequence[str], buckets: int) -> np.ndarray:
    """The bucket of each id among ``buckets``: a stable hash, the same on every machine."""
    return (id_hashes(ids, SALT) % np.uint64(buckets)).astype(np.int64)


def write_id_index(out: StageDir, table: pa.Table) -> None:
    """Write ``table`` (an ``id`` column, then any others) as the stage's ``ids/`` buckets.

    Every bucket file is written, empty ones too: their number is how a lookup finds the bucket.
    """
    buckets = max(1, -(-table.num_rows // ROWS_PER_BUCKET))
    keyed = table.append_column("bucket", pa.array(bucket_of(table["id"].to_pylist(), buckets)))
    keyed = keyed.sort_by([("bucket", "ascending"), ("id", "ascending")])
    bounds = np.searchsorted(keyed["bucket"].to_numpy(), np.arange(buckets + 1))
    rows = keyed.drop_columns(["bucket"])
    for bucket in range(buckets):
        buffer = BytesIO()
        part = rows.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket])
        pq.write_table(part, buffer, row_group_size=GROUP_ROWS)
        out.write_bytes_atomic(f"{IDS}/{bucket:05d}.parquet", buffer.getvalue())


def lookup(manifest: Manifest, doc_id: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of ``doc_id`` in the id index of a complete stage output (none: an empty table)."""
    buckets = sorted(f for f in manifest.files if f.startswith(f"{IDS}/") and f.endswith(".parquet"))
    if not buckets:
        raise StageError(f"{manifest.stage} output {manifest.path} has no id index ({IDS}/): it predates `crucible trace`")
    bucket = buckets[int(bucket_of([doc_id], len(buckets))[0])]
    return read_matching(join_uri(manifest.path, bucket), doc_id, columns)


def read_matching(uri: str, doc_id: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of one Parquet file whose ``id`` is ``doc_id``; only row groups whose id statistics
    admit it are read."""
    fs, path = filesystem_for(uri)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=pc.field("id") == doc_id)


def shard_tables(out: StageDir, folder: str, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """``columns`` of every finished Parquet shard in ``folder/``, with the shard's name relative
    to the stage folder (``documents/web-00000.parquet``), in name order."""
    selector = pafs.FileSelector(out.path(folder), allow_not_found=True)
    paths = sorted(i.path for i in out.fs.get_file_info(selector) if i.path.endswith(".parquet"))
    for path in paths:
        yield f"{folder}/{path.rsplit('/', 1)[1]}", pq.read_table(path, filesystem=out.fs, columns=columns)


def constant(value: str, rows: int) -> pa.Array:
    """A string column holding ``value`` in every row, dictionary-encoded (one copy of the string)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([value]))
