"""``crucible trace``: one document's lineage, stage by stage, down to the training steps that read it.

Each data stage is asked through what it writes for lookups by id (``tasks/data/id_index.py``):
ingest's ``ids/`` (input file and shard) and ``quarantine/``, filter's ``ids/`` (removed documents
and why), dedup's ``duplicates.parquet`` (sorted by id), pii's ``ids/`` (documents that had PII
replaced or were rejected) and tokenize's ``ids/`` (the token span of every copy of a document, or
why it was left out). A stage splits what it reads into kept and removed rows, so a document that
reached a stage and is not among its removed rows was kept. Every lookup reads one small file (an
index bucket, a row group); nothing reads a stage's documents or token shards.

The sequences holding a training document's tokens are mapped to the ``pretrain`` steps that read
them by inverting the loop's own order (``tasks/train/order.py``): the same seeded permutation per
epoch, cut into the same steps, workers and micro-batches, wrapping into further epochs as the
loop does. Steps are counted from 1, as MLflow logs them: step ``s`` is the ``s``-th optimizer step.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from tasks.config import PipelineConfig
from tasks.data.dedup import REASONS
from tasks.data.id_index import lookup, read_matching
from tasks.data.tokenize import SplitIndex, read_token_index
from tasks.engine import PlannedStage, plan
from tasks.errors import StageError
from tasks.stage import Manifest
from tasks.store import filesystem_for, join_uri
from tasks.train.order import GlobalOrder, micro_batch_of, positions_of, validation_sample
from tasks.train.pretrain import PretrainConfig

Status = Literal["kept", "removed", "quarantined", "read", "not_read", "missing"]
QUARANTINE_SHARD = re.compile(r"quarantine/(?P<source>.+)-\d{5}\.parquet")


class StageTrace(BaseModel):
    """What one stage did with the document; ``missing``: the stage's output is not complete."""

    stage: str
    status: Status
    fingerprint: str
    path: str = Field(description="the stage's output folder")
    reason: str | None = Field(None, description="why it was removed or quarantined")

    def detail(self) -> list[str]:
        """What the human-readable trace says besides the status: a line, then any further ones."""
        return [self.reason or ""]

    def lines(self) -> list[str]:
        first, *more = ["not run yet"] if self.status == "missing" else self.detail()
        return [f"  {self.stage:<9} {self.status:<12}{first}".rstrip(), *(f"{'':24}{line}" for line in more)]


class QuarantinedRow(BaseModel):
    file: str
    line: int
    error: str


class IngestTrace(StageTrace):
    stage: Literal["ingest"] = "ingest"
    source: str = ""
    file: str | None = Field(None, description="the input file it was read from, relative to its source's folder")
    shard: str | None = Field(None, description="the documents/ shard holding it")
    quarantined: list[QuarantinedRow] = Field(
        default_factory=list, description="quarantined rows of its source that name it (a repeat of its id, its line, its raw id)"
    )

    def detail(self) -> list[str]:
        rows = [f"{q.file}:{q.line}: {q.error}" for q in self.quarantined]
        if self.status != "kept":
            return rows
        return [f"{self.file} (source {self.source}) -> {self.shard}", *(f"also quarantined: {row}" for row in rows)]


class FilterTrace(StageTrace):
    stage: Literal["filter"] = "filter"
    shard: str | None = Field(None, description="the rejected/ shard holding it, when removed")

    def detail(self) -> list[str]:
        return [f"{self.reason} (row in {self.shard})" if self.status == "removed" else ""]


class DedupTrace(StageTrace):
    stage: Literal["dedup"] = "dedup"
    method: str | None = Field(None, description="exact or minhash")
    duplicate_of: str | None = Field(None, description="the document it was matched with, on the way to the survivor")
    similarity: float | None = None
    survivor: str | None = Field(None, description="the document its cluster kept (the cluster is named after it)")

    def detail(self) -> list[str]:
        if self.status != "removed":
            return [""]
        return [f"{self.reason}: duplicate of {self.duplicate_of} (similarity {self.similarity:.3f}); "
                f"its cluster kept {self.survivor}"]


class PiiTrace(StageTrace):
    stage: Literal["pii"] = "pii"
    replaced: dict[str, int] = Field(default_factory=dict, description="placeholders put in, per kind of PII")
    shard: str | None = None

    def detail(self) -> list[str]:
        hits = ", ".join(f"{kind} {n}" for kind, n in self.replaced.items())
        hits = f"replaced {hits}" if hits else "nothing replaced"
        return [f"{self.reason}: {hits} (row in {self.shard})" if self.status == "removed" else hits]


class Piece(BaseModel):
    """The document's tokens in one packed sequence."""

    sequence: int = Field(description="index of the sequence in its split (what the training order numbers)")
    shard: str = Field(description="the .npy file holding the sequence")
    row: int = Field(description="the sequence's row in that file")
    offset: int = Field(description="position of the document's first token here in the sequence")
    tokens: int


class Copy(BaseModel):
    """One copy of the document in its split's token stream (the mix may repeat a document)."""

    number: int = Field(description="which copy, from 0")
    start: int = Field(description="offset of its first token in the split's token stream")
    length: int = Field(description="its tokens, the EOS after it included")
    pieces: list[Piece]
    dropped: int = Field(description="tokens in the split's unpacked tail")


class TokenizeTrace(StageTrace):
    stage: Literal["tokenize"] = "tokenize"
    split: str | None = None
    copies: list[Copy] = Field(default_factory=list)

    def detail(self) -> list[str]:
        if self.status != "kept":
            return [f"{self.reason} ({self.split} split)"]
        return [f"{self.split} split, {len(self.copies)} cop{'y' if len(self.copies) == 1 else 'ies'}",
                *(_copy_text(c) for c in self.copies)]


class Read(BaseModel):
    step: int = Field(description="the optimizer step, from 1 (MLflow's step of its metrics)")
    rank: int = Field(description="the worker that read it")
    micro_batch: int
    epoch: int = Field(description="the pass over the training sequences it was read in, from 0")


class SequenceReads(BaseModel):
    sequence: int
    reads: list[Read]


class PretrainTrace(StageTrace):
    stage: Literal["pretrain"] = "pretrain"
    steps: list[int] = Field(default_factory=list, description="every training step that read the document's tokens")
    sequences: list[SequenceReads] = Field(default_factory=list, description="per training sequence holding its tokens")
    validation: list[int] = Field(
        default_factory=list, description="validation sequences holding its tokens that every validation pass reads"
    )
    validation_steps: list[int] = Field(default_factory=list, description="the steps after which validation passes run")

    def detail(self) -> list[str]:
        if self.validation:
            return [f"validation sequence{'s' * (len(self.validation) > 1)} {_numbers(self.validation)}, "
                    f"at every validation pass (after steps {_numbers(self.validation_steps)})"]
        if not self.steps:
            return ["no step reads its sequences"]
        return [f"steps {_numbers(self.steps)}", *(
            f"sequence {s.sequence}: " + (", ".join(
                f"step {r.step} (epoch {r.epoch}, rank {r.rank}, micro-batch {r.micro_batch})" for r in s.reads) or "not read")
            for s in self.sequences
        )]


AnyStageTrace = Annotated[
    IngestTrace | FilterTrace | DedupTrace | PiiTrace | TokenizeTrace | PretrainTrace, Field(discriminator="stage")
]


class DocumentTrace(BaseModel):
    """The ``crucible trace --json`` document: the stages the document went through, in order,
    up to the one that removed it (or the first one not run yet)."""

    config: str
    name: str
    store: str
    document: str
    stages: list[AnyStageTrace]

    def text(self) -> str:
        return "\n".join([f"{self.document}  ({self.name}, store: {self.store})", *(line for s in self.stages for line in s.lines())])


def _numbers(values: list[int]) -> str:
    return ", ".join(map(str, values))


def _copy_text(copy: Copy) -> str:
    """``copy 0: 223 tokens at stream offset 56 -> sequences 0-4 (train/00000.npy rows 0-4), from token
    56 of the first to token 22 of the last``."""
    head = f"copy {copy.number}: {copy.length} tokens at stream offset {copy.start}"
    tail = f", {copy.dropped} in the unpacked tail" if copy.dropped else ""
    if not copy.pieces:
        return f"{head}: none packed{tail}"
    first, last = copy.pieces[0], copy.pieces[-1]
    shards = {}
    for p in copy.pieces:
        shards.setdefault(p.shard, []).append(p.row)
    rows = ", ".join(f"{shard} rows {_span(r[0], r[-1])}" for shard, r in shards.items())
    return (f"{head} -> sequences {_span(first.sequence, last.sequence)} ({rows}), from token {first.offset} of the first "
            f"to token {last.offset + last.tokens - 1} of the last{tail}")


def _span(first: int, last: int) -> str:
    return f"{first}-{last}" if last > first else str(first)


# ---------------------------------------------------------------------------------- the stages


def _ingest(doc_id: str, manifest: Manifest, base: dict[str, str]) -> IngestTrace:
    source = doc_id.split("/", 1)[0]
    quarantined = _quarantined(manifest, doc_id)
    found = lookup(manifest, doc_id, ["file", "shard"]).to_pylist()
    if found:
        return IngestTrace(**base, status="kept", source=source, **found[0], quarantined=quarantined)
    if quarantined:
        return IngestTrace(**base, status="quarantined", source=source, reason=quarantined[0].error, quarantined=quarantined)
    raise StageError(
        f"unknown document id '{doc_id}': not among the {manifest.rows} documents ingest read "
        f"({manifest.path}), nor named by a row of its quarantine (ids are '{{source}}/{{id}}')"
    )


def _quarantined(manifest: Manifest, doc_id: str) -> list[QuarantinedRow]:
    """Quarantined rows of the document's source that name it: a repeat of its id, the file and
    line its id stands for (sources without ids), or its own id in the row's raw text."""
    source, _, raw_id = doc_id.partition("/")
    files = [join_uri(manifest.path, f) for f in manifest.files if (m := QUARANTINE_SHARD.fullmatch(f)) and m["source"] == source]
    if not files:
        return []
    fs, _ = filesystem_for(files[0])
    rows = pq.read_table([filesystem_for(f)[1] for f in files], filesystem=fs, columns=["file", "line", "error", "raw"])
    named = re.compile(rf"(?<![\w.:/-]){re.escape(raw_id)}(?![\w.:/-])")
    return [
        QuarantinedRow(file=r["file"], line=r["line"], error=r["error"])
        for r in rows.to_pylist()
        if r["error"] == f"repeated id '{doc_id}'" or f"{r['file']}:{r['line']}" == raw_id or named.search(r["raw"] or "")
    ]


def _filter(doc_id: str, manifest: Manifest, base: dict[str, str]) -> FilterTrace:
    found = lookup(manifest, doc_id, ["reason", "shard"]).to_pylist()
    return FilterTrace(**base, status="removed", **found[0]) if found else FilterTrace(**base, status="kept")


def _dedup(doc_id: str, manifest: Manifest, base: dict[str, str]) -> DedupTrace:
    found = read_matching(join_uri(manifest.path, "duplicates.parquet"), doc_id).to_pylist()
    if not found:
        return DedupTrace(**base, status="kept")
    row = found[0]
    return DedupTrace(
        **base, status="removed", reason=REASONS[row["method"]], method=row["method"], duplicate_of=row["duplicate_of"],
        similarity=row["similarity"], survivor=row["kept"],
    )


def _pii(doc_id: str, manifest: Manifest, base: dict[str, str]) -> PiiTrace:
    found = lookup(manifest, doc_id).to_pylist()
    if not found:
        return PiiTrace(**base, status="kept")
    row = found[0]
    replaced = {k.removeprefix("pii_"): n for k, n in row.items() if k.startswith("pii_") and n}
    status = "kept" if row["reason"] is None else "removed"
    return PiiTrace(**base, status=status, reason=row["reason"], replaced=replaced, shard=row["shard"])


def _tokenize(doc_id: str, manifest: Manifest, base: dict[str, str]) -> TokenizeTrace:
    rows = lookup(manifest, doc_id).to_pylist()
    if not rows:  # the stage read every document pii kept
        raise StageError(f"tokenize output {manifest.path} does not list '{doc_id}', which pii kept: its id index is incomplete")
    left_out = [r for r in rows if r["reason"] is not None]
    if left_out:
        return TokenizeTrace(**base, status="removed", reason=left_out[0]["reason"], split=left_out[0]["split"])
    index = read_token_index(manifest)
    split = rows[0]["split"]
    copies = [copy_location(r["copy"], r["start"], r["length"], index.seq_len, index.splits[split]) for r in sorted(rows, key=lambda r: r["copy"])]
    return TokenizeTrace(**base, status="kept", split=split, copies=copies)


def copy_location(copy: int, start: int, length: int, seq_len: int, split: SplitIndex) -> Copy:
    """Where the tokens ``start … start+length-1`` of a split's stream lie: sequence by sequence,
    up to the tail that filled no sequence."""
    shard_starts = np.cumsum([0] + [s.sequences for s in split.shards])
    pieces = []
    for sequence in range(start // seq_len, min((start + length - 1) // seq_len + 1, split.sequences)):
        first, last = max(start, sequence * seq_len), min(start + length, (sequence + 1) * seq_len)
        shard = int(np.searchsorted(shard_starts, sequence, side="right")) - 1
        pieces.append(Piece(sequence=sequence, shard=split.shards[shard].file, row=sequence - int(shard_starts[shard]),
                            offset=first - sequence * seq_len, tokens=last - first))
    return Copy(number=copy, start=start, length=length, pieces=pieces, dropped=length - sum(p.tokens for p in pieces))


def _pretrain(cfg: PretrainConfig, tokens: TokenizeTrace, tokenize: Manifest, base: dict[str, str]) -> PretrainTrace:
    """The steps whose batches hold the document's training sequences, and whether the validation
    passes read its validation sequences; the order and batching of ``tasks/train/loop.py``."""
    splits = read_token_index(tokenize).splits
    sequences = sorted({p.sequence for c in tokens.copies for p in c.pieces})
    if tokens.split == "val":
        val = splits["val"].sequences
        sampled = validation_sample(val, cfg.num_workers, cfg.batch_size, cfg.eval_batches)
        read = sorted(set(sequences) & set(sampled.tolist()))
        steps = sorted({s for s in range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)} | {cfg.steps})
        return PretrainTrace(**base, status="read" if read else "not_read", validation=read, validation_steps=steps if read else [])
    reads = _training_reads(cfg, splits["train"].sequences, sequences)
    steps = sorted({r.step for s in reads for r in s.reads})
    return PretrainTrace(**base, status="read" if steps else "not_read", steps=steps, sequences=reads)


def _training_reads(cfg: PretrainConfig, size: int, sequences: list[int]) -> list[SequenceReads]:
    order = GlobalOrder(size, cfg.seed)  # as train_worker builds it
    positions, rows = positions_of(order, np.array(sequences, dtype=np.int64), cfg.steps * cfg.global_batch)
    step, micro, rank = micro_batch_of(positions, world=cfg.num_workers, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
    epoch = positions // size
    return [
        SequenceReads(sequence=s, reads=[
            Read(step=int(step[i]) + 1, rank=int(rank[i]), micro_batch=int(micro[i]), epoch=int(epoch[i]))
            for i in np.flatnonzero(rows == s)
        ])
        for s in sequences
    ]


DATA_STAGES = {"ingest": _ingest, "filter": _filter, "dedup": _dedup, "pii": _pii, "tokenize": _tokenize}
MODELS = {"ingest": IngestTrace, "filter": FilterTrace, "dedup": DedupTrace, "pii": PiiTrace, "tokenize": TokenizeTrace,
          "pretrain": PretrainTrace}


def trace_document(config: PipelineConfig, config_path: str, doc_id: str) -> DocumentTrace:
    """The document's lineage through every configured data stage and ``pretrain``.

    Raises ``StageError`` when ``ingest`` is not configured or has not run, or when no stage
    knows the id. A later stage not run yet ends the trace with a ``missing`` entry.
    """
    planned = plan(config)
    if "ingest" not in planned:
        raise StageError("trace follows documents from ingest, and this config has no 'ingest' section")
    if planned["ingest"].manifest() is None:
        raise StageError(f"stage 'ingest' has not run yet (fingerprint {planned['ingest'].fingerprint}): "
                         f"run `crucible run {config_path} --until ingest` first")
    stages: list[StageTrace] = []
    for name in [s for s in (*DATA_STAGES, "pretrain") if s in planned]:
        found = _stage(config, planned, name, doc_id, stages)
        stages.append(found)
        if found.status not in ("kept", "read"):
            break
    return DocumentTrace(config=config_path, name=config.name, store=config.store_uri(), document=doc_id, stages=stages)


def _stage(config: PipelineConfig, planned: dict[str, PlannedStage], name: str, doc_id: str, before: list[StageTrace]) -> StageTrace:
    me = planned[name]
    base = {"fingerprint": me.fingerprint, "path": me.out.uri}
    manifest = me.manifest()
    if manifest is None:
        return MODELS[name](**base, status="missing")
    if name == "pretrain":
        return _pretrain(config.section(name), before[-1], planned["tokenize"].manifest(), base)
    return DATA_STAGES[name](doc_id, manifest, base)
