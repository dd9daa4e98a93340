"""Text normalization, word shingles and MinHash-LSH signatures, vectorized over Arrow batches.

Everything here is pure (no Ray): ``dedup`` calls it inside ``map_batches``/``map_groups`` and
the tests and the benchmark call it directly. Hashes are stable across processes, machines and
runs (blake2b for words and texts, fixed-seed permutations), so the same corpus always gives the
same signatures, buckets and candidate pairs.

Normalization (used by both exact and fuzzy dedup): Unicode NFKC, lowercase, every punctuation
(``\\p{P}``) and symbol (``\\p{S}``) character replaced by a space, then whitespace collapsed
(runs of any Unicode whitespace become one space; leading/trailing removed). So
``"Hello,  World!"`` and ``"hello world"`` normalize to the same text, ``"don't"`` to ``"don t"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_PUNCTUATION_AND_SYMBOLS = r"[\p{P}\p{S}]+"
_U64 = np.uint64
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_NGRAM_BASE = _U64(0x9E3779B97F4A7C15)  # odd: the polynomial combining word hashes into an n-gram hash
_CHUNK_SHINGLES = 1 << 12  # shingles per (shingles x permutations) block: ~3 MB at 100 perms, cache-sized


def normalized_words(texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """Each text as its list of normalized words (see the module docstring)."""
    texts = pc.utf8_normalize(texts, "NFKC")
    texts = pc.replace_substring_regex(pc.utf8_lower(texts), _PUNCTUATION_AND_SYMBOLS, " ")
    split = pc.utf8_split_whitespace(texts)
    split = split.combine_chunks() if isinstance(split, pa.ChunkedArray) else split
    # leading/trailing whitespace and empty texts yield "" items: drop them
    flat, owner = pc.list_flatten(split), pc.list_parent_indices(split).to_numpy()
    nonempty = pc.not_equal(flat, "")
    counts = np.bincount(owner[nonempty.to_numpy(zero_copy_only=False)], minlength=len(split))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    return pa.ListArray.from_arrays(offsets, flat.filter(nonempty))


def text_hashes(words: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """128-bit blake2b of each normalized text (words joined by one space) as two uint64 columns."""
    joined = pc.binary_join(words, " ").to_pylist()
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in joined)
    both = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a cheap bijection that spreads every input bit over the output."""
    x = x ^ (x >> _U64(30))
    x = x * _MIX1
    x = x ^ (x >> _U64(27))
    x = x * _MIX2
    return x ^ (x >> _U64(31))


def _word_hashes(flat_words: pa.Array) -> np.ndarray:
    """64-bit hash of every word, hashing each distinct word of the batch once."""
    if len(flat_words) == 0:
        return np.zeros(0, dtype=_U64)
    encoded = pc.dictionary_encode(flat_words)
    digests = b"".join(
        hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest() for w in encoded.dictionary.to_pylist()
    )
    vocabulary = np.frombuffer(digests, dtype="<u8")
    return vocabulary[encoded.indices.to_numpy(zero_copy_only=False)]


def shingle_hashes(words: pa.ListArray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word ``ngram``-gram of every document, flat, with per-document offsets.

    Returns ``(values, offsets)``: document ``d``'s shingles are ``values[offsets[d]:offsets[d+1]]``.
    A document shorter than ``ngram`` words has one shingle (all its words); an empty one has none.
    Repeated n-grams are kept (MinHash ignores them; ``jaccard`` de-duplicates).
    """
    lengths = pc.fill_null(pc.list_value_length(words), 0).to_numpy().astype(np.int64)
    tokens = _word_hashes(pc.list_flatten(words))
    word_starts = np.concatenate([[0], np.cumsum(lengths)])
    counts = np.where(lengths > 0, np.maximum(lengths - ngram + 1, 1), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if offsets[-1] == 0:
        return np.zeros(0, dtype=_U64), offsets
    # polynomial hash of the n words starting at every token (zero-padded past the end) ...
    padded = np.concatenate([tokens, np.zeros(ngram - 1, dtype=_U64)])
    rolling = np.zeros(len(tokens), dtype=_U64)
    for i in range(ngram):
        rolling = rolling * _NGRAM_BASE + padded[i : i + len(tokens)]
    # ... kept at each document's first `counts` tokens
    position = np.arange(len(tokens)) - np.repeat(word_starts[:-1], lengths)
    values = rolling[position < np.repeat(counts, lengths)]
    # a document shorter than ngram read into the next one: recompute it with zero padding
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if len(short):
        fixed = np.zeros(len(short), dtype=_U64)
        for i in range(ngram):
            word = padded[np.minimum(word_starts[short] + i, len(tokens) - 1)]
            fixed = fixed * _NGRAM_BASE + np.where(i < lengths[short], word, _U64(0))
        values[offsets[short]] = fixed
    return mix64(values), offsets


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle sets (repeats ignored); 0 when both are empty."""
    a, b = np.unique(a), np.unique(b)
    union = len(a) + len(b)
    if union == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (union - inter)


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """The LSH S-curve: chance that two documents of this Jaccard share at least one band."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** rows) ** bands


def lsh_threshold(bands: int, rows: int) -> float:
    """Where the S-curve is steepest, ~(1/bands)^(1/rows): the similarity LSH "cuts" at."""
    return (1.0 / bands) ** (1.0 / rows)


@dataclass(frozen=True)
class MinHasher:
    """MinHash over word n-grams with ``num_perm`` hash permutations, then LSH banding.

    Permutation ``p`` of a shingle hash ``x`` is ``(a_p * x + b_p) mod 2^64`` with ``a_p`` odd
    (multiply-add hashing); the signature keeps the top 32 bits of each minimum, which is the same
    as the minimum of the top 32 bits, so the shift happens once per document instead of once per
    shingle. Shingle hashes are already mixed 64-bit values, so this cheap family behaves like
    random permutations (the tests check the estimate against exact Jaccard).
    """

    ngram: int = 5
    num_perm: int = 100
    seed: int = 42

    @cached_property
    def _params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, np.iinfo(np.uint64).max, size=self.num_perm, dtype=np.uint64, endpoint=True) | _U64(1)
        b = rng.integers(0, np.iinfo(np.uint64).max, size=self.num_perm, dtype=np.uint64, endpoint=True)
        return a, b

    def signatures(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``(documents, num_perm)`` uint32 signatures; documents without shingles get all-ones rows."""
        a, b = self._params
        n_docs = len(offsets) - 1
        minima = np.full((n_docs, self.num_perm), np.iinfo(np.uint64).max, dtype=_U64)
        nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
        doc_starts = offsets[nonempty]
        total = int(offsets[-1])
        buffer = np.empty((min(total, _CHUNK_SHINGLES), self.num_perm), dtype=_U64)
        for start in range(0, total, _CHUNK_SHINGLES):
            end = min(start + _CHUNK_SHINGLES, total)
            block = np.multiply(values[start:end, None], a, out=buffer[: end - start])
            block += b
            # non-empty documents overlapping [start, end): the one holding `start`, then those starting inside
            lo = np.searchsorted(doc_starts, start, side="right") - 1
            hi = np.searchsorted(doc_starts, end, side="left")
            docs = nonempty[lo:hi]
            segments = np.maximum(offsets[docs], start) - start
            minima[docs] = np.minimum(minima[docs], np.minimum.reduceat(block, segments, axis=0))
        return (minima >> _U64(32)).astype(np.uint32)

    def band_keys(self, signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
        """``(documents, bands)`` uint64 keys: documents share a key iff they agree on that band's rows.

        The band index is mixed into the key, so equal rows in different bands never collide.
        """
        if bands * rows > self.num_perm:
            raise ValueError(f"bands x rows = {bands * rows} exceeds num_perm = {self.num_perm}")
        parts = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(_U64)
        keys = np.broadcast_to(mix64(np.arange(1, bands + 1, dtype=_U64)), (len(signatures), bands))
        for r in range(rows):
            keys = mix64(keys ^ parts[:, :, r])
        return keys


def estimated_similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """MinHash estimate of Jaccard: the share of permutations whose minima agree (row-wise)."""
    return (np.asarray(sig_a) == np.asarray(sig_b)).mean(axis=-1)
