"""Build, load and save Crucible tokenizers as Hugging Face fast tokenizers.

``train_tokenizer`` learns a byte-level BPE (GPT-2 style pre-tokenization, 256 byte symbols as
the base alphabet, so every string round-trips and nothing is ever unknown) with Crucible's
special tokens at ids 0… and the chat template of ``models.chat``. ``load_tokenizer`` takes an
existing tokenizer folder instead (e.g. the one shipped with an open-weight model) and adds only
what Crucible needs that it lacks. ``save_tokenizer`` writes a folder that
``AutoTokenizer.from_pretrained`` loads, with the chat template inside
``tokenizer_config.json``.

Encoding never adds special tokens by itself: pretraining packing appends ``<|eos|>`` after each
document explicitly, and the chat template writes ``<|bos|>`` itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.chat import BOS, CHAT_TEMPLATE, CHAT_TOKENS, EOS, PAD, SPECIAL_TOKENS, has_assistant_markers

if TYPE_CHECKING:  # transformers takes seconds to import: only the functions that need it do
    from transformers import PreTrainedTokenizerFast

BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, length: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; the result may be smaller than ``vocab_size`` on a tiny corpus.

    ``length`` (the number of texts, if known) only feeds the trainer's progress accounting.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )


class MissingChatTemplate(ValueError):
    """A checkpoint's tokenizer has no chat template and none was given."""


def load_tokenizer(
    path: str | Path, *, chat_template: str = "keep", missing: Literal["crucible", "error"] = "crucible"
) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """Load a local tokenizer folder and complete it; return it with the tokens that had to be added.

    Always needed: an EOS (packing separates documents with it) and a pad token (the EOS is
    reused rather than growing the vocabulary). ``chat_template`` is ``keep`` (the folder's own),
    ``crucible`` (Crucible's: it then also needs a BOS and the role markers) or a Jinja template
    to install as it is. A folder without a template under ``keep`` gets Crucible's, or raises
    ``MissingChatTemplate`` when ``missing="error"`` (fine-tuning an open-weight model should not
    silently grow its vocabulary). A model trained with another tokenizer must resize its
    embeddings to ``len(tokenizer)`` when tokens were added.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: Crucible needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    added: list[str] = []
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
        added.append(EOS)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template not in ("keep", "crucible"):
        tokenizer.chat_template = chat_template
    elif chat_template == "crucible" or not tokenizer.chat_template:
        if chat_template == "keep" and missing == "error":
            raise MissingChatTemplate(
                f"the tokenizer in {path} has no chat template: set chat_template to a Jinja template "
                "(the text or a file), or to crucible (installs Crucible's template and adds its role tokens)"
            )
        if tokenizer.bos_token is None:
            tokenizer.add_special_tokens({"bos_token": BOS})
            added.append(BOS)
        vocab = tokenizer.get_vocab()
        missing_tokens = [t for t in CHAT_TOKENS if t not in vocab]
        if missing_tokens:
            tokenizer.add_special_tokens({"extra_special_tokens": missing_tokens}, replace_extra_special_tokens=False)
            added.extend(missing_tokens)
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, added


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> list[Path]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (template inside) to a local folder.

    The config names the generic ``PreTrainedTokenizerFast`` class and lists the role markers as
    ``additional_special_tokens``, the spelling every transformers release reads (4.x as well as
    5.x), so vLLM and lm-eval load the folder whatever transformers they ship with.
    """
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if extra:
        config["additional_special_tokens"] = extra
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(p for p in directory.iterdir() if p.is_file())


def encode_chat(
    tokenizer: PreTrainedTokenizerFast, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its assistant mask (1 = a token the assistant wrote).

    Templates with ``{% generation %}`` blocks mark the assistant's tokens themselves. Most
    open-weight templates have none: there the assistant's spans are found by rendering the
    conversation up to each assistant turn (with the generation prompt) and through it; what
    the turn adds, trailing whitespace aside, is the reply and its end-of-turn marker.
    An assistant turn with ``"weight": 0`` is left out of the mask.
    """
    if has_assistant_markers(tokenizer.chat_template):
        encoded = tokenizer.apply_chat_template(
            list(messages),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
        )
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    else:
        ids, mask = _encode_by_rendering(tokenizer, list(messages), add_generation_prompt)
    return ids, _without_weightless_turns(messages, mask)


def _without_weightless_turns(messages: Sequence[dict[str, Any]], mask: list[int]) -> list[int]:
    """The mask with the spans of assistant turns marked ``"weight": 0`` cleared: context the
    model reads but is not taught to write (e.g. the flawed reply a critique exercise quotes).

    Each assistant turn is one run of 1s, in order (turns alternate, so runs never touch).
    """
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if all(weights):
        return mask
    runs = [i for i, bit in enumerate(mask) if bit and (i == 0 or not mask[i - 1])]
    if len(runs) != len(weights):
        raise ValueError(f"{len(runs)} assistant spans for {len(weights)} assistant turns: cannot leave out a turn's tokens")
    out = list(mask)
    for start, weight in zip(runs, weights):
        end = start
        while end < len(out) and mask[end]:
            if not weight:
                out[end] = 0
            end += 1
    return out


def _render(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_by_rendering(
    tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    text = _render(tokenizer, messages, add_generation_prompt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template does not render each conversation as a prefix of the next turn, so the "
                "assistant's tokens cannot be found: use a template with {% generation %} blocks"
            )
        spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def bytes_per_token(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over ``texts`` (higher = better compression); NaN for no tokens."""
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else float("nan")
