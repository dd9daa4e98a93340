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
from typing import TYPE_CHECKING, Literal

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


def load_tokenizer(
    path: str | Path, *, chat_template: Literal["keep", "crucible"] = "keep"
) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """Load a local tokenizer folder and complete it; return it with the tokens that had to be added.

    Always needed: an EOS (packing separates documents with it) and a pad token (the EOS is
    reused rather than growing the vocabulary). Crucible's chat template is installed when the
    tokenizer has none or ``chat_template="crucible"``; it then also needs a BOS and the role
    markers. A model trained with another tokenizer must resize its embeddings to
    ``len(tokenizer)`` when tokens were added.
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
    if chat_template == "crucible" or not tokenizer.chat_template:
        if tokenizer.bos_token is None:
            tokenizer.add_special_tokens({"bos_token": BOS})
            added.append(BOS)
        vocab = tokenizer.get_vocab()
        missing = [t for t in CHAT_TOKENS if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            added.extend(missing)
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

    The mask comes from the template's ``{% generation %}`` blocks; a template without them
    cannot tell the assistant's tokens apart, so it is refused rather than training on the prompt.
    """
    if not has_assistant_markers(tokenizer.chat_template):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} blocks, so assistant tokens cannot be "
            "masked; load it with chat_template='crucible'"
        )
    encoded = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def bytes_per_token(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> float:
    """UTF-8 bytes per token over ``texts`` (higher = better compression); NaN for no tokens."""
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else float("nan")
