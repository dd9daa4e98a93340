"""``tokenize``: documents -> mixed, packed, fixed-length token sequences for pretraining.

How (Ray Data, then one streaming consumer):

1. **Tokenize.** ``read_parquet`` -> ``map_batches(TokenizeDocuments)``: an actor pool, each
   actor loading the ``tokenizer`` stage's tokenizer once and encoding batches with the
   Rust fast tokenizer. Each document is assigned to ``val`` when ``uniform(id) < val_fraction``
   (a hash of the id alone: the same documents for every seed and mix, and a larger fraction's
   validation set contains a smaller one's). The tokenized documents are materialized
   (Ray spills them to disk when they outgrow memory).
2. **Mix.** Training tokens are counted per (domain, lang) cell, and ``plan_mix`` sets a
   sampling rate per cell so that the domain shares match ``mix`` and the language shares match
   ``lang_mix`` (iterative proportional fitting when both are given), for a budget of
   ``total_tokens`` (default: all tokens of the mixed-in cells). A training document with rate
   ``r`` appears ``floor(r)`` times plus once more when ``uniform(seed, id) < r - floor(r)``:
   deterministic, unbiased, and repeats are whole documents. Domains (languages) missing from
   ``mix`` (``lang_mix``) or weighted 0 are dropped. Validation documents are never repeated or
   subsampled; only those of dropped cells are left out. Every document that ends with no copy
   is kept for audit in ``rejected/00000.parquet`` (``id``, ``source``, ``domain``, ``lang``,
   ``split``, ``reason``), like the other data stages' removed rows, and counted in the manifest
   as ``rejected`` and ``rejected.<reason>``. The reasons, in the order they are decided:
   ``domain_not_in_mix`` (missing from ``mix`` or weighted 0), ``lang_not_in_mix`` (likewise
   for ``lang_mix``), ``no_training_documents`` (a validation document of a domain/language
   cell that has no training tokens, so no rate) and ``mix_subsampled`` (a training document
   of a subsampled cell, rate below 1, that drew no copy).
3. **Order.** Every document copy gets the key ``hash(seed, id, copy)`` and Ray Data sorts on it:
   a seeded shuffle in which the copies of a repeated document land far apart, and an order
   that does not depend on the number of workers or the shard layout.
4. **Pack.** This process streams the sorted rows and packs each split separately.

**Packing rule.** Within a split, the document copies, in key order, each followed by one
``<|eos|>`` (the tokenizer's EOS), are concatenated into one stream; the stream is cut into
consecutive rows of exactly ``seq_len`` tokens. Nothing is padded, no BOS is inserted, rows may
start or end inside a document, and the only tokens lost are the last ``len(stream) % seq_len``
(``dropped_tokens``, fewer than ``seq_len``).

**Output format** (what ``pretrain`` reads; ``load_token_shards`` does it for you)::

    index.json                    TokenIndex, below
    ids/00000.parquet…            where each document's tokens lie (below)
    train/00000.npy, 00001.npy…   numpy .npy, 2-D [sequences, seq_len], C order, dtype from index.json
    val/00000.npy…                same (absent when val_fraction is 0)

``index.json``: ``format`` ("crucible-tokens/1"), ``seq_len``, ``dtype`` ("uint16" when every id
fits, i.e. ``vocab_size <= 65536``, else "uint32"), ``vocab_size`` (``len(tokenizer)``: every id is
below it), ``eos_token_id`` / ``bos_token_id`` / ``pad_token_id``, ``tokenizer`` (URI of the
tokenizer folder to ship with the model), ``splits.{train,val}``: ``shards`` (``[{file, sequences}]``,
files relative to the stage folder, in stream order), ``sequences``, ``tokens``
(= sequences × seq_len), ``documents`` (document copies in the stream), ``dropped_tokens``,
``tokens_by_domain`` and ``tokens_by_lang`` (packed tokens, summing to ``tokens``); ``mix``:
per domain (``mix.domain``) and language (``mix.lang``, when ``lang_mix`` is set)
``{available, target, achieved}`` (available training tokens before mixing, target share or
null, achieved share of packed training tokens); ``mix.budget`` (the training-token budget).

``ids/`` (``tasks/data/id_index.py``, what ``crucible trace`` reads): one row per document copy in a
split (``id``, ``split``, ``copy``, ``start``: the offset of its first token in the split's token
stream, whose sequence ``i`` holds tokens ``i*seq_len … (i+1)*seq_len-1``, ``length``: its tokens
with the EOS) and one per document left out (``id``, ``split``, ``reason``).
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from itertools import chain
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.data.filter import _ShardWriter
from tasks.data.filters.batch import REASON_FIELD
from tasks.data.id_index import write_id_index
from tasks.data.tokenizer import (
    id_hashes,
    id_uniform,
    load_backend_tokenizer,
    load_stage_tokenizer,
    tokenizer_uri,
)
from tasks.errors import StageError
from tasks.stage import Manifest, Stage, StageContext, StageResult
from tasks.store import StageDir, filesystem_for, join_uri

FORMAT = "crucible-tokens/1"
INDEX = "index.json"
SPLITS = ("train", "val")
VAL_SALT = "tokenize-val"
MIX_ITERATIONS = 500
MIX_TOLERANCE = 1e-6

Cell = tuple[str, str]  # (domain, lang); lang is "" when languages are not mixed
REJECTED = "rejected/00000.parquet"
ID_INDEX_SCHEMA = pa.schema(
    [("id", pa.string()), ("split", pa.string()), ("copy", pa.int32()), ("start", pa.int64()), ("length", pa.int32()),
     ("reason", pa.string())]
)
REJECTED_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("lang", pa.string()),
     ("split", pa.string()), REASON_FIELD]
)


class TokenizeConfig(BaseModel):
    """How documents become training sequences: mixture, sequence length, validation split."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(2048, ge=2, description="tokens per packed sequence")
    mix: dict[str, float] | None = Field(
        None, description="target share of training tokens per domain (weights, normalized); unlisted domains are dropped"
    )
    lang_mix: dict[str, float] | None = Field(
        None, description="target share of training tokens per language (the `lang` column); unlisted languages are dropped"
    )
    total_tokens: int | None = Field(
        None, ge=1, description="training tokens to draw (documents repeat or are subsampled); default: all mixed-in tokens"
    )
    val_fraction: float = Field(0.01, ge=0, lt=1, description="share of documents held out for validation (by id hash)")
    seed: int = Field(0, description="seeds resampling and document order")
    sequences_per_shard: int = Field(4096, ge=1, description="sequences per .npy shard")
    batch_size: int = Field(256, ge=1, description="documents per tokenization batch")
    num_workers: int | None = Field(None, ge=1, description="tokenizer actors (default: one per CPU)")

    @field_validator("mix", "lang_mix")
    @classmethod
    def _weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is None:
            return None
        if any(w < 0 or not math.isfinite(w) for w in weights.values()):
            raise ValueError("weights must be finite and >= 0")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("at least one weight must be > 0")
        return weights


# ---------------------------------------------------------------------------------- index format


class ShardEntry(BaseModel):
    file: str = Field(description="relative to the stage folder")
    sequences: int


class SplitIndex(BaseModel):
    shards: list[ShardEntry] = Field(default_factory=list)
    sequences: int = 0
    tokens: int = 0
    documents: int = 0
    dropped_tokens: int = 0
    tokens_by_domain: dict[str, int] = Field(default_factory=dict)
    tokens_by_lang: dict[str, int] = Field(default_factory=dict)


class MixShare(BaseModel):
    available: int = Field(description="training tokens before mixing")
    target: float | None = Field(description="target share of training tokens (None: not targeted)")
    achieved: float = Field(description="share of packed training tokens")


class MixReport(BaseModel):
    budget: int = Field(description="training tokens the mix aimed for (before packing)")
    domain: dict[str, MixShare]
    lang: dict[str, MixShare] | None = None


class TokenIndex(BaseModel):
    """``index.json`` of a ``tokenize`` stage (see the module docstring)."""

    format: Literal["crucible-tokens/1"] = FORMAT
    seq_len: int
    dtype: Literal["uint16", "uint32"]
    vocab_size: int
    eos_token_id: int
    bos_token_id: int | None
    pad_token_id: int | None
    tokenizer: str
    splits: dict[str, SplitIndex]
    mix: MixReport


# ---------------------------------------------------------------------------------- reading


def read_token_index(source: Manifest | str) -> TokenIndex:
    """The ``index.json`` of a ``tokenize`` output (its manifest, or its folder path/URI)."""
    root = source.path if isinstance(source, Manifest) else source
    fs, path = filesystem_for(join_uri(root, INDEX))
    with fs.open_input_stream(path) as src:
        return TokenIndex.model_validate_json(src.read())


class TokenShards:
    """One split's sequences as a random-access ``[sequences, seq_len]`` array over its shards.

    Local shards are memory-mapped, remote ones read on first use. Files open lazily and are not
    pickled, so the object is cheap to send to Ray Train workers.
    """

    def __init__(self, files: list[str], sequences: list[int], seq_len: int, dtype: str):
        self.files, self.seq_len, self.dtype = files, seq_len, np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(sequences, dtype=np.int64)])
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:
            arrays = []
            for file in self.files:
                fs, path = filesystem_for(file)
                if isinstance(fs, pafs.LocalFileSystem):
                    arrays.append(np.load(path, mmap_mode="r"))
                else:
                    with fs.open_input_file(path) as src:
                        arrays.append(np.load(io.BytesIO(src.read())))
            self._arrays = arrays
        return self._arrays

    def unigram_entropy(self, vocab_size: int) -> float:
        """Entropy (nats per token) of the split's token frequencies: the loss of the best model
        that ignores context. A language model's loss well below it shows it uses the context."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for array in self._open():
            counts += np.bincount(np.asarray(array).ravel(), minlength=vocab_size)[:vocab_size]
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> np.ndarray:
        """Row ``i`` as ``[seq_len]``, or rows at several indices / a slice as ``[n, seq_len]``."""
        single = isinstance(index, (int, np.integer))
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.atleast_1d(np.asarray(index, np.int64))
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"sequence index out of range ({len(self)} sequences)")
        arrays = self._open()
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), self.seq_len), dtype=self.dtype)
        for shard in np.unique(shard_of):
            here = shard_of == shard
            out[here] = arrays[shard][rows[here] - self.starts[shard]]
        return out[0] if single else out


def load_token_shards(source: Manifest | str, split: str = "train") -> TokenShards:
    """The packed sequences of ``split`` ("train" or "val") of a ``tokenize`` output."""
    root = source.path if isinstance(source, Manifest) else source
    index = read_token_index(root)
    entry = index.splits[split]
    files = [join_uri(root, s.file) for s in entry.shards]
    return TokenShards(files, [s.sequences for s in entry.shards], index.seq_len, index.dtype)


# ---------------------------------------------------------------------------------- mixing


def _shares(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items() if w > 0}


def plan_mix(
    available: Mapping[Cell, int],
    mix: Mapping[str, float] | None,
    lang_mix: Mapping[str, float] | None,
    budget: int | None,
) -> tuple[dict[Cell, float], int]:
    """Sampling rate per (domain, lang) cell, and the token budget they aim for.

    ``available``: training tokens per cell. The rates ``r`` make ``sum(r * available)`` equal the
    budget, with domain shares ``mix`` and language shares ``lang_mix``. With both, iterative
    proportional fitting finds the rates closest to the corpus's own proportions that meet both;
    targets no table can meet together are an error, as is a target on something absent.
    """
    axes: list[tuple[int, dict[str, float], str]] = []
    if mix is not None:
        axes.append((0, _shares(mix), "domain"))
    if lang_mix is not None:
        axes.append((1, _shares(lang_mix), "language"))
    cells = {c: n for c, n in available.items() if n > 0 and all(c[axis] in shares for axis, shares, _ in axes)}
    for axis, shares, what in axes:
        absent = sorted(k for k in shares if not any(c[axis] == k for c in cells))
        if absent:
            raise StageError(
                f"tokenize: the mix asks for {what}(s) {', '.join(absent)}, but no training documents have them"
            )
    if not cells:
        raise StageError("tokenize: no training tokens to mix")
    total = budget or sum(cells.values())
    fitted = {c: float(n) for c, n in cells.items()}
    if not axes:
        scale = total / sum(fitted.values())
        return {c: scale for c in cells}, total

    def off_target(axis: int, shares: dict[str, float]) -> float:
        sums: dict[str, float] = defaultdict(float)
        for c, m in fitted.items():
            sums[c[axis]] += m
        return max(abs(sums[k] / total - s) for k, s in shares.items())

    for _ in range(MIX_ITERATIONS):
        for axis, shares, _what in axes:
            sums: dict[str, float] = defaultdict(float)
            for c, m in fitted.items():
                sums[c[axis]] += m
            for c in fitted:
                fitted[c] *= shares[c[axis]] * total / sums[c[axis]]
        if all(off_target(axis, shares) < MIX_TOLERANCE for axis, shares, _ in axes):
            break
    else:
        raise StageError(
            "tokenize: mix and lang_mix cannot both be met with the documents available "
            "(some domain has no documents in the languages it would need)"
        )
    return {c: fitted[c] / cells[c] for c in cells}, total


# ---------------------------------------------------------------------------------- Ray stages


class TokenizeDocuments:
    """Ray Data actor: loads the tokenizer once, then turns document batches into token lists."""

    def __init__(self, tokenizer: str, val_fraction: float, use_lang: bool, has_source: bool = True):
        self.backend = load_backend_tokenizer(tokenizer)
        self.val_fraction, self.use_lang, self.has_source = val_fraction, use_lang, has_source

    def __call__(self, batch: pa.Table) -> pa.Table:
        encodings = self.backend.encode_batch_fast(batch.column("text").to_pylist(), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.uint32, count=int(offsets[-1]))
        ids = batch.column("id")
        lang = pc.fill_null(batch.column("lang"), "") if self.use_lang else pa.array([""] * len(batch), pa.string())
        source = batch.column("source") if self.has_source else pa.nulls(len(batch), pa.string())
        return pa.table(
            {
                "id": ids,
                "source": source,
                "domain": batch.column("domain"),
                "lang": lang,
                "val": pa.array(id_uniform(ids.to_pylist(), VAL_SALT) < self.val_fraction),
                "length": pa.array(lengths + 1),  # + the EOS packing appends
                "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
            }
        )


def _rates_and_copies(batch: pa.Table, rates: dict[Cell, float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's cell rate and number of copies (validation: 1 when its cell is mixed in)."""
    cells = zip(batch.column("domain").to_pylist(), batch.column("lang").to_pylist())
    rate = np.array([rates.get(c, 0.0) for c in cells], dtype=np.float64)
    ids = batch.column("id").to_pylist()
    whole = np.floor(rate)
    train_copies = whole.astype(np.int64) + (id_uniform(ids, f"tokenize-mix:{seed}") < rate - whole)
    val = batch.column("val").to_numpy(zero_copy_only=False)
    return rate, np.where(val, (rate > 0).astype(np.int64), train_copies)


def select_copies(batch: pa.Table, rates: dict[Cell, float], seed: int) -> pa.Table:
    """Repeat/subsample documents to their cell's rate; give each copy its order key."""
    ids = batch.column("id").to_pylist()
    _, copies = _rates_and_copies(batch, rates, seed)
    rows = np.repeat(np.arange(len(batch)), copies)
    copy = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
    keys = id_hashes([f"{ids[r]}\0{c}" for r, c in zip(rows, copy)], f"tokenize-order:{seed}") >> np.uint64(1)
    out = batch.take(pa.array(rows, type=pa.int64()))
    return out.append_column("copy", pa.array(copy)).append_column("key", pa.array(keys.astype(np.int64)))


def rejected_documents(
    batch: pa.Table, rates: dict[Cell, float], seed: int, domains: list[str] | None, langs: list[str] | None
) -> pa.Table:
    """The documents of ``batch`` that get no copy, with why (``REJECTED_SCHEMA``).

    ``domains``/``langs``: the domains/languages mixed in (positive weight), None when that axis
    is not mixed. Decided with the same rates and draws as ``select_copies``, so the two agree.
    """
    rate, copies = _rates_and_copies(batch, rates, seed)
    gone = np.flatnonzero(copies == 0)
    if not len(gone):
        return REJECTED_SCHEMA.empty_table()
    part = batch.take(pa.array(gone, type=pa.int64()))
    val = part.column("val").to_pylist()
    reasons = []
    for domain, lang, r in zip(part.column("domain").to_pylist(), part.column("lang").to_pylist(), rate[gone]):
        if domains is not None and domain not in domains:
            reasons.append("domain_not_in_mix")
        elif langs is not None and lang not in langs:
            reasons.append("lang_not_in_mix")
        elif r == 0:
            reasons.append("no_training_documents")
        else:
            reasons.append("mix_subsampled")
    return pa.table(
        {
            "id": part.column("id"),
            "source": part.column("source") if "source" in part.column_names else pa.nulls(len(part), pa.string()),
            "domain": part.column("domain"),
            "lang": part.column("lang") if langs is not None else pa.nulls(len(part), pa.string()),
            "split": pa.array(["val" if v else "train" for v in val], pa.string()),
            "reason": pa.array(reasons, pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )


# ---------------------------------------------------------------------------------- packing


class SequencePacker:
    """Cuts one split's token stream into ``seq_len`` rows; counts packed tokens per cell."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.buffer = np.empty(0, dtype=np.uint32)
        self.pending: list[tuple[Cell, int]] = []  # cells of the buffered tokens, in order
        self.tokens: Counter[Cell] = Counter()
        self.documents = 0
        self.appended = 0  # tokens in the split's stream so far: where the next document starts

    def add(self, stream: np.ndarray, lengths: np.ndarray, cells: list[Cell]) -> np.ndarray:
        """Append documents (``stream``: their tokens, EOS included, ``lengths`` of each); return full rows."""
        self.documents += len(cells)
        self.appended += len(stream)
        stream = np.concatenate([self.buffer, stream])
        segments = self.pending + list(zip(cells, lengths.tolist()))
        cut = len(stream) // self.seq_len * self.seq_len
        self.buffer = stream[cut:]
        self.pending = []
        left = cut
        for cell, n in segments:
            used = min(n, left)
            if used:
                self.tokens[cell] += used
            if n > used:
                self.pending.append((cell, n - used))
            left -= used
        return stream[:cut].reshape(-1, self.seq_len)

    @property
    def dropped(self) -> int:
        return len(self.buffer)


def document_stream(batch: pa.Table, eos: int) -> tuple[np.ndarray, np.ndarray, list[Cell]]:
    """The batch's documents as one token array, each followed by ``eos``; their lengths and cells."""
    tokens = batch.column("tokens").combine_chunks()
    offsets = tokens.offsets.to_numpy()
    flat = tokens.flatten().to_numpy()
    stream = np.insert(flat, offsets[1:] - offsets[0], np.uint32(eos))
    cells = list(zip(batch.column("domain").to_pylist(), batch.column("lang").to_pylist()))
    return stream, np.diff(offsets) + 1, cells


class ShardWriter:
    """Writes one split's rows as ``{split}/NNNNN.npy`` shards of ``rows_per_shard`` rows, atomically."""

    def __init__(self, out: StageDir, split: str, rows_per_shard: int, dtype: str):
        self.out, self.split, self.rows_per_shard, self.dtype = out, split, rows_per_shard, np.dtype(dtype)
        self.pending: list[np.ndarray] = []
        self.held = 0
        self.shards: list[ShardEntry] = []

    def add(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(rows.astype(self.dtype, copy=False))
            self.held += len(rows)
        while self.held >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def close(self) -> list[ShardEntry]:
        if self.held:
            self._write(self.held)
        return self.shards

    def _write(self, count: int) -> None:
        rows = np.concatenate(self.pending)
        shard, rest = rows[:count], rows[count:]
        self.pending, self.held = ([rest] if len(rest) else []), len(rest)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(shard), allow_pickle=False)
        name = f"{self.split}/{len(self.shards):05d}.npy"
        self.out.write_bytes_atomic(name, buffer.getvalue())
        self.shards.append(ShardEntry(file=name, sequences=len(shard)))


# ---------------------------------------------------------------------------------- stage


def _documents_manifest(ctx: StageContext) -> Manifest:
    (documents,) = (m for name, m in ctx.upstream.items() if name != "tokenizer")
    return documents


def _has_column(fs: pafs.FileSystem, paths: list[str], column: str) -> bool:
    return column in pq.read_schema(paths[0], filesystem=fs).names


def _write_rejected(
    ctx: StageContext, tokenized: Any, rates: dict[Cell, float], cfg: TokenizeConfig
) -> pa.Table:
    """Every document left out of the mix into ``rejected/`` (filter's shard writer); returns their
    ``id``, ``split`` and ``reason``."""
    ctx.out.make("rejected")
    writer = _ShardWriter(ctx.out.fs, ctx.out.path(REJECTED), REJECTED_SCHEMA)
    domains = sorted(_shares(cfg.mix)) if cfg.mix is not None else None
    langs = sorted(_shares(cfg.lang_mix)) if cfg.lang_mix is not None else None
    left_out = [REJECTED_SCHEMA.empty_table().select(["id", "split", "reason"])]
    rejected = tokenized.select_columns(["id", "source", "domain", "lang", "val"]).map_batches(
        rejected_documents, batch_format="pyarrow",
        fn_kwargs={"rates": rates, "seed": cfg.seed, "domains": domains, "langs": langs},
    )
    for batch in rejected.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows:
            writer.write(batch)
            left_out.append(batch.select(["id", "split", "reason"]))
    writer.close(keep_empty=True)
    return pa.concat_tables(left_out)


def _spans(part: pa.Table, split: str, first: int, lengths: np.ndarray) -> pa.Table:
    """Id index rows of the document copies in ``part``, packed from stream offset ``first`` on."""
    return pa.table({
        "id": part.column("id"),
        "split": pa.array([split] * len(part), pa.string()),
        "copy": part.column("copy").cast(pa.int32()),
        "start": pa.array(first + np.cumsum(lengths) - lengths, pa.int64()),
        "length": pa.array(lengths, pa.int32()),
    })


def _id_index(spans: list[pa.Table], left_out: pa.Table) -> pa.Table:
    """``ids/``: the spans of every packed copy, then the documents left out with their reason."""
    rows = [t.append_column("reason", pa.nulls(len(t), pa.string())) for t in spans]
    rows.append(pa.table({
        "id": left_out["id"], "split": left_out["split"], "copy": pa.nulls(len(left_out), pa.int32()),
        "start": pa.nulls(len(left_out), pa.int64()), "length": pa.nulls(len(left_out), pa.int32()),
        "reason": left_out["reason"],
    }))
    return pa.concat_tables([ID_INDEX_SCHEMA.empty_table(), *(t.cast(ID_INDEX_SCHEMA) for t in rows)])


def _training_tokens(tokenized: Any) -> Counter[Cell]:
    """Training tokens (EOS included) per cell, from the materialized tokenized documents."""
    totals: Counter[Cell] = Counter()
    columns = tokenized.select_columns(["domain", "lang", "val", "length"])
    for batch in columns.iter_batches(batch_format="pyarrow", batch_size=None):
        train = batch.filter(pc.invert(batch.column("val")))
        grouped = train.group_by(["domain", "lang"]).aggregate([("length", "sum")])
        for row in grouped.to_pylist():
            totals[(row["domain"], row["lang"])] += row["length_sum"]
    return totals


def _ordered(tokenized: Any, rates: dict[Cell, float], seed: int) -> Iterator[pa.Table]:
    copies = tokenized.map_batches(select_copies, batch_format="pyarrow", fn_kwargs={"rates": rates, "seed": seed})
    ordered = copies.sort(["key", "id", "copy"])
    ordered.context.execution_options.preserve_order = True
    yield from ordered.iter_batches(batch_format="pyarrow", batch_size=None)


def _by(counter: Mapping[Cell, int], axis: int) -> dict[str, int]:
    out: Counter[str] = Counter()
    for cell, n in counter.items():
        out[cell[axis]] += n
    return dict(sorted(out.items()))


def _mix_shares(
    available: dict[str, int], targets: Mapping[str, float] | None, packed: dict[str, int]
) -> dict[str, MixShare]:
    total = sum(packed.values()) or 1
    wanted = _shares(targets) if targets is not None else {}
    return {
        k: MixShare(
            available=available.get(k, 0),
            target=wanted.get(k, 0.0) if targets is not None else None,
            achieved=packed.get(k, 0) / total,
        )
        for k in sorted(set(available) | set(packed) | set(wanted))
    }


def run(ctx: StageContext) -> StageResult:
    import ray

    cfg: TokenizeConfig = ctx.config
    fs, paths = _documents_manifest(ctx).files_in("documents")
    if not paths:
        raise StageError("tokenize: the upstream stage has no documents")
    use_lang = cfg.lang_mix is not None
    if use_lang and not _has_column(fs, paths, "lang"):
        raise StageError("tokenize: lang_mix needs a `lang` column (added by the filter stage's language ID)")
    tok_uri = tokenizer_uri(ctx.upstream["tokenizer"])
    tokenizer = load_stage_tokenizer(tok_uri)
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 2**16 else "uint32"

    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    has_source = _has_column(fs, paths, "source")
    columns = ["id", "text", "domain"] + (["source"] if has_source else []) + (["lang"] if use_lang else [])
    tokenized = (
        ray.data.read_parquet(paths, columns=columns, filesystem=fs)
        .map_batches(
            TokenizeDocuments,
            fn_constructor_args=(tok_uri, cfg.val_fraction, use_lang, has_source),
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        )
        .materialize()
    )
    available = _training_tokens(tokenized)
    rates, budget = plan_mix(available, cfg.mix, cfg.lang_mix, cfg.total_tokens)
    left_out = _write_rejected(ctx, tokenized, rates, cfg)

    packers = {split: SequencePacker(cfg.seq_len) for split in SPLITS}
    writers = {split: ShardWriter(ctx.out, split, cfg.sequences_per_shard, dtype) for split in SPLITS}
    spans: list[pa.Table] = []
    for batch in _ordered(tokenized, rates, cfg.seed):
        is_val = batch.column("val")
        for split, part in (("train", batch.filter(pc.invert(is_val))), ("val", batch.filter(is_val))):
            if len(part):
                stream, lengths, cells = document_stream(part, tokenizer.eos_token_id)
                spans.append(_spans(part, split, packers[split].appended, lengths))
                writers[split].add(packers[split].add(stream, lengths, cells))
    write_id_index(ctx.out, _id_index(spans, left_out))

    splits: dict[str, SplitIndex] = {}
    for split in SPLITS:
        shards, packer = writers[split].close(), packers[split]
        sequences = sum(s.sequences for s in shards)
        splits[split] = SplitIndex(
            shards=shards,
            sequences=sequences,
            tokens=sequences * cfg.seq_len,
            documents=packer.documents,
            dropped_tokens=packer.dropped,
            tokens_by_domain=_by(packer.tokens, 0),
            tokens_by_lang=_by(packer.tokens, 1) if use_lang else {},
        )
    if splits["train"].sequences == 0:
        raise StageError(f"tokenize: the training data holds fewer than seq_len={cfg.seq_len} tokens")

    train = splits["train"]
    mix = MixReport(
        budget=budget,
        domain=_mix_shares(_by(available, 0), cfg.mix, train.tokens_by_domain),
        lang=_mix_shares(_by(available, 1), cfg.lang_mix, train.tokens_by_lang) if use_lang else None,
    )
    index = TokenIndex(
        seq_len=cfg.seq_len,
        dtype=dtype,
        vocab_size=vocab,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tok_uri,
        splits=splits,
        mix=mix,
    )
    ctx.out.write_bytes_atomic(INDEX, index.model_dump_json(indent=2).encode())
    ctx.log.log_dict(index.model_dump(mode="json"), INDEX)
    return _result(index, Counter(left_out["reason"].to_pylist()))


def _result(index: TokenIndex, rejected: Counter[str] | None = None) -> StageResult:
    rejected = rejected or Counter()
    counts: dict[str, int] = {"rejected": sum(rejected.values())}
    counts |= {f"rejected.{reason}": n for reason, n in sorted(rejected.items())}
    for split, entry in index.splits.items():
        counts |= {
            f"sequences.{split}": entry.sequences,
            f"tokens.{split}": entry.tokens,
            f"documents.{split}": entry.documents,
            f"dropped_tokens.{split}": entry.dropped_tokens,
        }
        counts |= {f"tokens.{split}.{domain}": n for domain, n in entry.tokens_by_domain.items()}
    metrics: dict[str, float] = {}
    for axis, shares in (("domain", index.mix.domain), ("lang", index.mix.lang or {})):
        for key, share in shares.items():
            metrics[f"share.{axis}.{key}.achieved"] = share.achieved
            if share.target is not None:
                metrics[f"share.{axis}.{key}.target"] = share.target
    rows = sum(e.sequences for e in index.splits.values())
    tokens = sum(e.tokens for e in index.splits.values())
    train, val = index.splits["train"], index.splits["val"]
    table = "\n".join(
        f"| {d} | {s.available} | {'' if s.target is None else f'{s.target:.3f}'} | {s.achieved:.3f} "
        f"| {train.tokens_by_domain.get(d, 0)} |"
        for d, s in index.mix.domain.items()
    )
    report = (
        f"Packed **{train.sequences}** training and **{val.sequences}** validation sequences of {index.seq_len} tokens "
        f"(**{tokens}** tokens, {index.dtype}, vocabulary {index.vocab_size}).\n\n"
        f"| domain | available tokens | target share | achieved share | packed tokens |\n|---|---|---|---|---|\n{table}\n"
    )
    if rejected:
        report += (
            f"\n**{sum(rejected.values())}** documents left out of the mix (see `rejected/`): "
            + ", ".join(f"`{reason}` {n}" for reason, n in sorted(rejected.items())) + ".\n"
        )
    return StageResult(rows=rows, tokens=tokens, counts=counts, metrics=metrics, report=report)


STAGE = Stage(name="tokenize", upstream=("pii", "tokenizer"), version="3", run=run)
