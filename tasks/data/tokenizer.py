"""``tokenizer``: train Crucible's byte-level BPE on a sample of the documents, or adopt an existing one.

The sample is the ``sample_docs`` documents with the smallest ``hash(seed, id)``: uniform over
the corpus, the same whatever the shard layout or the number of workers, and stable as the
corpus grows (a document in the sample stays in it unless a smaller hash arrives). A Ray Data
job hashes every id and keeps only rows under a threshold set from the upstream row count, so
only about ``sample_docs`` texts ever reach this process. The sample is ordered by hash; its
last ``heldout_fraction`` is kept out of training and measures compression (UTF-8 bytes per
token). With ``path``, the tokenizer at that folder is completed (``models.tokenizer.load_tokenizer``)
instead of trained, and the whole sample measures it.

Output: ``tokenizer/`` (``tokenizer.json``, ``tokenizer_config.json`` with the chat template),
loadable by ``AutoTokenizer.from_pretrained``; ``load_stage_tokenizer`` loads it from any store.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from models.tokenizer import MIN_VOCAB_SIZE, bytes_per_token, load_tokenizer, save_tokenizer, train_tokenizer
from tasks.digest import folder_digest
from tasks.errors import ConfigError, StageError
from tasks.stage import DIGESTED, Manifest, Stage, StageContext, StageResult
from tasks.store import filesystem_for, join_uri

TOKENIZER_DIR = "tokenizer"
SAMPLE_SALT = "tokenizer-sample"
EXAMPLE_TOKENS = 40


class TokenizerConfig(BaseModel):
    """Train a BPE tokenizer (``vocab_size``…) or use an existing one (``path``)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(32_000, ge=MIN_VOCAB_SIZE, description="target vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often in the sample to be learned")
    sample_docs: int = Field(
        50_000, ge=1, description="documents sampled (uniformly, by id hash) to train on and measure"
    )
    heldout_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of the sample kept out of training to measure bytes per token"
    )
    seed: int = Field(0, description="picks the sample")
    path: str | None = Field(
        None, description="local folder of an existing Hugging Face tokenizer to use instead of training",
        json_schema_extra=DIGESTED,
    )
    chat_template: Literal["keep", "crucible"] = Field(
        "keep", description="with `path`: keep its chat template if it has one, or install Crucible's"
    )

    @model_validator(mode="after")
    def _train_or_adopt(self) -> TokenizerConfig:
        # Compare with the defaults, not with what was typed: a form (the Prefect UI) sends every field.
        changed = {name for name, f in type(self).model_fields.items() if getattr(self, name) != f.default}
        if self.path is not None:
            clash = sorted({"vocab_size", "min_frequency", "heldout_fraction"} & changed)
            if clash:
                raise ValueError(
                    f"{', '.join(clash)} only apply when training; with `path` the tokenizer is used as it is"
                )
        elif "chat_template" in changed:
            raise ValueError("chat_template only applies with `path`; a trained tokenizer always has Crucible's")
        return self


# ---------------------------------------------------------------------------------- hashing


def id_hashes(ids: Sequence[str], salt: str) -> np.ndarray:
    """A stable 64-bit hash of each id (the same on every machine and Python run)."""
    prefix = salt.encode() + b"\0"
    digests = b"".join(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def id_uniform(ids: Sequence[str], salt: str) -> np.ndarray:
    """A stable uniform number in [0, 1) per id: deterministic sampling decisions by document."""
    return (id_hashes(ids, salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---------------------------------------------------------------------------------- sampling


def _below(batch: pa.Table, salt: str, threshold: int | None) -> pa.Table:
    keys = id_hashes(batch.column("id").to_pylist(), salt)
    keep = keys < np.uint64(threshold) if threshold is not None else np.ones(len(keys), dtype=bool)
    return pa.table({"key": pa.array(keys[keep]), "text": batch.column("text").filter(pa.array(keep))})


def sample_texts(
    paths: list[str], k: int, seed: int, rows: int | None, filesystem: pafs.FileSystem | None = None
) -> list[str]:
    """The texts of the ``k`` documents with the smallest ``hash(seed, id)``, in hash order.

    Workers drop every row whose hash lies above ``k`` plus a few standard deviations' worth of
    the expected rows; if chance still leaves fewer than ``k`` under it, the sample is simply
    all of those (still the smallest hashes, still deterministic).
    """
    import ray

    if not paths:
        return []
    share = 1.0 if not rows else (k + 4 * math.sqrt(k) + 16) / rows
    threshold = int(share * 2**64) if share < 1.0 else None
    salt = f"{SAMPLE_SALT}:{seed}"
    keys: list[np.ndarray] = []
    texts: list[str] = []
    kept = ray.data.read_parquet(paths, columns=["id", "text"], filesystem=filesystem).map_batches(
        _below, batch_format="pyarrow", fn_kwargs={"salt": salt, "threshold": threshold}
    )
    for batch in kept.iter_batches(batch_format="pyarrow", batch_size=None):
        keys.append(batch.column("key").to_numpy())
        texts.extend(batch.column("text").to_pylist())
    if not texts:
        return []
    order = np.argsort(np.concatenate(keys), kind="stable")[:k]
    return [texts[i] for i in order]


# ---------------------------------------------------------------------------------- loading


def tokenizer_uri(manifest: Manifest) -> str:
    """Where a completed ``tokenizer`` stage keeps its Hugging Face files."""
    return join_uri(manifest.path, TOKENIZER_DIR)


def load_stage_tokenizer(uri: str) -> Any:
    """Load the tokenizer folder at ``uri`` (local path or object-store URI) as a fast HF tokenizer."""
    from transformers import AutoTokenizer

    fs, root = filesystem_for(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return AutoTokenizer.from_pretrained(root, local_files_only=True)
    with tempfile.TemporaryDirectory() as local:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as src:
                    Path(local, info.base_name).write_bytes(src.read())
        return AutoTokenizer.from_pretrained(local, local_files_only=True)


def load_backend_tokenizer(uri: str) -> Tokenizer:
    """Just the Rust tokenizer of the folder at ``uri``: what workers encode with, without importing transformers."""
    fs, root = filesystem_for(uri)
    with fs.open_input_stream(f"{root.rstrip('/')}/tokenizer.json") as src:
        return Tokenizer.from_str(src.read().decode("utf-8"))


def inputs_digest(cfg: TokenizerConfig, _pipeline: Any) -> str:
    """With ``path``, the output depends on the files there: their names and contents, not where
    the folder lies (``tasks/digest.py``)."""
    if cfg.path is None:
        return ""
    folder = Path(cfg.path).expanduser()
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError("config", [("tokenizer.path", f"no tokenizer.json in '{cfg.path}'")])
    return folder_digest(folder)


# ---------------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> StageResult:
    cfg: TokenizerConfig = ctx.config
    (documents,) = ctx.upstream.values()
    fs, paths = documents.files_in("documents")
    sample = sample_texts(paths, cfg.sample_docs, cfg.seed, documents.rows, filesystem=fs)
    if not sample:
        raise StageError("tokenizer: the upstream stage has no documents to sample")

    added: list[str] = []
    if cfg.path is not None:
        tokenizer, added = load_tokenizer(Path(cfg.path).expanduser(), chat_template=cfg.chat_template)
        train, heldout = [], sample
    else:
        held = min(len(sample) - 1, round(len(sample) * cfg.heldout_fraction))
        train, heldout = sample[: len(sample) - held], sample[len(sample) - held :]
        tokenizer = train_tokenizer(train, cfg.vocab_size, min_frequency=cfg.min_frequency, length=len(train))

    with tempfile.TemporaryDirectory() as local:
        for file in save_tokenizer(tokenizer, local):
            ctx.out.write_bytes_atomic(f"{TOKENIZER_DIR}/{file.name}", file.read_bytes())

    vocab = len(tokenizer)
    counts = {"vocab_size": vocab, "sample_docs": len(sample), "train_docs": len(train), "heldout_docs": len(heldout)}
    metrics: dict[str, float] = {}
    if heldout:
        metrics["heldout_bytes_per_token"] = bytes_per_token(tokenizer, heldout)
    if added:
        counts["added_tokens"] = len(added)
    report = _report(cfg, tokenizer, counts, metrics, added, heldout)
    return StageResult(rows=len(sample), counts=counts, metrics=metrics, report=report)


def _report(
    cfg: TokenizerConfig,
    tokenizer: Any,
    counts: dict[str, int],
    metrics: dict[str, float],
    added: list[str],
    heldout: list[str],
) -> str:
    origin = (
        f"adopted from `{cfg.path}`" if cfg.path else f"trained (byte-level BPE) on {counts['train_docs']} sampled documents"
    )
    lines = [f"Tokenizer {origin}: **{counts['vocab_size']}** tokens."]
    if "heldout_bytes_per_token" in metrics:
        lines.append(
            f"Held-out compression: **{metrics['heldout_bytes_per_token']:.3f}** UTF-8 bytes per token "
            f"({counts['heldout_docs']} documents)."
        )
    if added:
        lines.append("Added: " + ", ".join(f"`{t}`" for t in added) + " (resize the model's embeddings).")
    if heldout:
        ids = tokenizer(heldout[0], add_special_tokens=False)["input_ids"][:EXAMPLE_TOKENS]
        pieces = " | ".join(tokenizer.decode([i]).replace("\n", "\\n").replace("`", "'") for i in ids)
        lines += ["", f"First held-out tokens: `{pieces}`"]
    return "\n".join(lines) + "\n"


STAGE = Stage(name="tokenizer", upstream=("pii",), version="1", run=run, inputs=inputs_digest)
