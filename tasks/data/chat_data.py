"""Chat, preference and prompt data: the formats post-training reads, validated row by row.

One example per JSONL line or Parquet row; an optional ``id`` field names it (default: file and
line). Three shapes, the conventions TRL and OpenRLHF use:

- **chat** (``sft``): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, …]}``.
  An optional system message first, then user and assistant turns alternating, ending with an
  assistant turn (multi-turn is fine; every assistant turn is a training target, unless it has
  ``"weight": 0``, OpenAI's convention: read as context, never taught).
- **preference** (``reward``, ``align: dpo``): ``{"prompt": …, "chosen": …, "rejected": …}``.
  ``prompt`` is a string (one user turn) or a message list ending with a user turn; ``chosen``
  and ``rejected`` are strings or one-message lists with the assistant's reply. They must differ.
  An optional numeric ``margin`` says how strongly ``chosen`` wins (used by the reward loss).
- **prompt** (``align: ppo | grpo``): ``{"prompt": …, "answer": str | null}``; ``answer`` is the
  reference a verifiable reward checks against (e.g. an arithmetic result).

A row that breaks a rule goes to quarantine with its file, line and what is wrong (the style of
``tasks/data/ingest.py``): counted and reported, never fatal, never taking a good row with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.data.ingest import QUARANTINE_SCHEMA, RAW_PREVIEW, BadRow, list_source_files, relative_name
from tasks.errors import ConfigError
from tasks.stage import DIGESTED
from tasks.store import filesystem_for

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
T = TypeVar("T")


class ChatSource(BaseModel):
    """Files of one kind of post-training data: a file, a glob or an object-store URI."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="short unique name; prefixes every id")
    path: str = Field(
        ..., description="file, glob (`data/chat/*.jsonl`) or URI (`s3://bucket/prefs/*.parquet`)", json_schema_extra=DIGESTED
    )
    format: Literal["jsonl", "parquet"] = "jsonl"


class StageSource(BaseModel):
    """Data another stage of the pipeline wrote: ``{stage: feedback, split: preferences}``.

    The stage becomes an upstream of the one reading it, so fingerprints chain through it.
    """

    model_config = ConfigDict(extra="forbid")

    stage: Literal["feedback"]
    split: Literal["revisions", "preferences"] = Field(
        ..., description="`revisions` (chat: prompt -> final revision) or `preferences` (AI-labelled pairs)"
    )

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.split}"

    @property
    def kind(self) -> Literal["chat", "preference"]:
        return "chat" if self.split == "revisions" else "preference"

    @property
    def file(self) -> str:
        """The file, relative to the stage's output folder."""
        return f"{self.split}.jsonl"


DataSource = ChatSource | StageSource


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (ending with a user turn) and two assistant replies, the first preferred."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float = 0.0  # how strongly chosen is preferred (the reward loss's optional margin)


@dataclass(frozen=True)
class PromptRow:
    """A prompt for sampling, with the reference answer a verifiable reward checks, if any."""

    prompt: list[Message]
    answer: str | None


# ---------------------------------------------------------------------------------- validation


def _messages(value: Any, name: str) -> list[Message]:
    """A message list in canonical form (role + content only), or ``BadRow`` saying what is wrong."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{name}' must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise BadRow(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"{where}.role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRow(f"{where}.content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRow(f"{where}.content is empty")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, float) or (weight == 0 and role != "assistant"):
            raise BadRow(f"{where}.weight must be 0 or 1, and only on an assistant message, got {weight!r}")
        out.append({"role": role, "content": content, **({"weight": 0} if weight == 0 else {})})
    return out


def _check_turns(messages: list[Message], name: str, last: str) -> list[Message]:
    """Optional system first, then user/assistant alternating from a user turn, ending with ``last``."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        index = i + len(messages) - len(turns)
        if message["role"] == "system":
            raise BadRow(f"{name}[{index}] is a system message; only the first message may be one")
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRow(f"{name}[{index}].role is '{message['role']}', expected '{expected}' (turns must alternate)")
    if not turns or turns[-1]["role"] != last:
        raise BadRow(f"'{name}' must end with a turn by the {last}")
    return messages


def parse_chat(record: dict[str, Any]) -> list[Message]:
    """A chat row's conversation: at least one user turn answered by the assistant."""
    if "messages" not in record:
        raise BadRow("missing field 'messages'")
    messages = _check_turns(_messages(record["messages"], "messages"), "messages", last="assistant")
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise BadRow("every assistant turn has weight 0: nothing to learn")
    return messages


def _prompt(record: dict[str, Any]) -> list[Message]:
    if "prompt" not in record:
        raise BadRow("missing field 'prompt'")
    value = record["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("'prompt' is empty")
        return [{"role": "user", "content": value}]
    return _check_turns(_messages(value, "prompt"), "prompt", last="user")


def _reply(record: dict[str, Any], name: str) -> list[Message]:
    if name not in record:
        raise BadRow(f"missing field '{name}'")
    value = record[name]
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"'{name}' is empty")
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRow(f"'{name}' must be a string or a list of exactly one assistant message")
    return messages


def parse_preference(record: dict[str, Any]) -> PreferencePair:
    margin = record.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
        raise BadRow(f"'margin' must be a number, got {margin!r}")
    pair = PreferencePair(_prompt(record), _reply(record, "chosen"), _reply(record, "rejected"), float(margin))
    if pair.chosen == pair.rejected:
        raise BadRow("'chosen' and 'rejected' are identical")
    return pair


def parse_prompt(record: dict[str, Any]) -> PromptRow:
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise BadRow(f"'answer' must be a string or a number, got {type(answer).__name__}")
    return PromptRow(_prompt(record), None if answer is None else str(answer))


PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "chat": parse_chat,
    "preference": parse_preference,
    "prompt": parse_prompt,
}


# ---------------------------------------------------------------------------------- reading


def _records(fs: pafs.FileSystem, path: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(line or row number, record or BadRow) for every non-blank line / every row of one file."""
    if fmt == "parquet":
        with fs.open_input_file(path) as handle:
            row = 0
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        return
    with fs.open_input_stream(path) as stream:
        data = stream.read()
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        raw = line[: RAW_PREVIEW * 4].decode("utf-8", errors="replace")
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield lineno, BadRow(f"invalid UTF-8 at byte {exc.start}", raw)
            continue
        except json.JSONDecodeError as exc:
            yield lineno, BadRow(f"malformed JSON: {exc.msg} (column {exc.colno})", raw)
            continue
        yield lineno, record if isinstance(record, dict) else BadRow(f"expected a JSON object, got {type(record).__name__}", raw)


@dataclass(frozen=True)
class Example(Generic[T]):
    """One valid row: its id, where it was read, and its parsed value."""

    id: str
    source: str
    file: str
    line: int
    value: T

    def quarantine_row(self, error: str) -> dict[str, Any]:
        """A quarantine entry for a row that parsed but cannot be used (e.g. too long once tokenised)."""
        return {"source": self.source, "file": self.file, "line": self.line, "error": error, "raw": self.id}


@dataclass
class Loaded(Generic[T]):
    """Valid examples in file order, and the quarantined rows."""

    rows: list[Example[T]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)


def load_examples(sources: list[ChatSource], kind: Literal["chat", "preference", "prompt"], where: str) -> Loaded:
    """Read and validate every row of ``sources`` as ``kind``.

    ``where`` names the config field for errors (``sft.data``). A source matching no file is a
    ``ConfigError``; bad rows and unreadable files are quarantined; a repeated id is a bad row.
    """
    parse = PARSERS[kind]
    loaded: Loaded = Loaded()
    seen: set[str] = set()
    problems = []
    for i, source in enumerate(sources):
        try:
            base, files = list_source_files(source)  # type: ignore[arg-type]  # reads .path only
        except (OSError, ValueError) as exc:
            problems.append((f"{where}[{i}].path", f"cannot read '{source.path}': {exc}"))
            continue
        if not files:
            problems.append((f"{where}[{i}].path", f"no files match '{source.path}'"))
            continue
        fs = filesystem_for(source.path)[0]
        for info in files:
            rel = relative_name(info.path, base)

            def quarantine(line: int, error: str, raw: str = "") -> None:
                loaded.quarantine.append(
                    {"source": source.name, "file": rel, "line": line, "error": error, "raw": raw[:RAW_PREVIEW]}
                )

            try:
                for line, record in _records(fs, info.path, source.format):
                    if isinstance(record, BadRow):
                        quarantine(line, str(record), record.raw)
                        continue
                    raw = json.dumps(record, default=str, ensure_ascii=False)
                    try:
                        example = parse(record)
                    except BadRow as bad:
                        quarantine(line, str(bad), raw)
                        continue
                    raw_id = record.get("id")
                    example_id = f"{source.name}/{raw_id if raw_id not in (None, '') else f'{rel}:{line}'}"
                    if example_id in seen:
                        quarantine(line, f"repeated id '{example_id}'", raw)
                        continue
                    seen.add(example_id)
                    loaded.rows.append(Example(example_id, source.name, rel, line, example))
            except (OSError, pa.ArrowException) as exc:
                quarantine(0, f"unreadable file: {exc}")
    if problems:
        raise ConfigError("config", problems)
    return loaded


def is_held_out(example_id: str, fraction: float) -> bool:
    """A stable split by a hash of the id: the same example is held out in every run."""
    digest = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def write_quarantine(fs: pafs.FileSystem, path: str, rows: list[dict[str, Any]]) -> None:
    """Quarantined rows as one Parquet file (the schema ``ingest`` uses); nothing when none."""
    if rows:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), path, filesystem=fs)
