"""Decontamination: drop documents that share a long word n-gram with an evaluation set.

Training on benchmark text inflates evaluation scores; the GPT-3 recipe removes any document
sharing a 13-word sequence with an evaluation example. Words are lower-cased ``\\w+`` runs, so
punctuation and spacing differences do not hide a copy. Each n-gram becomes a 64-bit
polynomial hash of stable per-word hashes (the same in every process, unlike ``hash``), and
the evaluation n-grams are one sorted NumPy array that Ray shares between workers without
copying.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from tasks.digest import listed_digest, listing_digest
from tasks.errors import ConfigError
from tasks.stage import DIGESTED
from tasks.store import filesystem_for, is_remote

_WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x100000001B3)


class EvalFile(BaseModel):
    """A JSONL evaluation set; every listed field of every line is protected."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="JSONL file (local path or URI)", json_schema_extra=DIGESTED)
    text_fields: list[str] = Field(["text"], min_length=1, description="fields holding text (strings or lists of strings)")


class DecontaminationConfig(BaseModel):
    """Drop documents sharing an ``ngram``-word sequence with any evaluation text."""

    model_config = ConfigDict(extra="forbid")

    files: list[EvalFile] = Field(..., min_length=1)
    ngram: int = Field(13, ge=3, description="n-gram length in words (13 as in GPT-3)")


@lru_cache(maxsize=1 << 18)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of every ``n``-word window of ``text`` (empty when it has fewer words)."""
    words = np.fromiter((_word_hash(w) for w in _WORD.findall(text.lower())), dtype=np.uint64)
    windows = len(words) - n + 1
    if windows <= 0:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(windows, dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps: a polynomial hash mod 2**64
        hashes = hashes * _MULTIPLIER + words[k : k + windows]
    return hashes


@dataclass(frozen=True)
class EvalIndex:
    """Sorted unique n-gram hashes of the evaluation texts, with what went into them."""

    hashes: np.ndarray
    ngram: int
    texts: int
    short_texts: int  # fewer than ``ngram`` words: cannot be matched
    bad_lines: int

    def contaminated(self, text: str) -> bool:
        if not len(self.hashes):
            return False
        found = ngram_hashes(text, self.ngram)
        if not len(found):
            return False
        at = np.searchsorted(self.hashes, found)
        at[at == len(self.hashes)] = 0
        return bool(np.any(self.hashes[at] == found))


def _field_texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def build_index(cfg: DecontaminationConfig, field: str = "filter.decontamination") -> EvalIndex:
    """Read every evaluation file; an unreadable file is a config error naming it (``field``: where
    the config holds ``cfg``)."""
    parts, texts, short, bad = [], 0, 0, 0
    for i, spec in enumerate(cfg.files):
        fs, path = filesystem_for(spec.path)
        try:
            with fs.open_input_stream(path) as stream:
                data = stream.read()
        except OSError as exc:
            raise ConfigError("config", [(f"{field}.files[{i}].path", f"cannot read '{spec.path}': {exc}")]) from None
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad += 1
                continue
            if not isinstance(record, dict):
                bad += 1
                continue
            for field in spec.text_fields:
                for text in _field_texts(record.get(field)):
                    texts += 1
                    hashes = ngram_hashes(text, cfg.ngram)
                    short += not len(hashes)
                    parts.append(hashes)
    hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
    return EvalIndex(hashes=hashes, ngram=cfg.ngram, texts=texts, short_texts=short, bad_lines=bad)


def eval_files_digest(cfg: DecontaminationConfig, field: str = "filter.decontamination") -> str:
    """The output depends on the evaluation files' contents (``tasks/digest.py``), not on their
    names or where they lie: only their texts go into the index."""
    parts = {}
    for i, spec in enumerate(cfg.files):
        fs, path = filesystem_for(spec.path)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise ConfigError("config", [(f"{field}.files[{i}].path", f"no such file '{spec.path}'")])
        parts[str(i)] = listed_digest(info, is_remote(spec.path))
    return listing_digest(parts)
