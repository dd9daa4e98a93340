"""Crucible's special tokens and chat template.

Documents are packed for pretraining as ``text <|eos|> text <|eos|> …``; ``<|bos|>`` opens a
conversation and ``<|pad|>`` fills batches. A conversation renders as::

    <|bos|><|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

Each assistant turn's content *and* its closing ``<|end|>`` sit inside ``{% generation %}``,
so ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly
the tokens SFT trains on: the model learns what to say and when to stop, never the prompt,
the role headers or the newline between turns. With ``add_generation_prompt`` the template
ends in ``<|assistant|>\\n``, where generation starts; generation stops at ``<|end|>``
(``STOP_TOKENS``).
"""

from __future__ import annotations

import re

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

ROLE_MARKERS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TOKENS: tuple[str, ...] = (*ROLE_MARKERS.values(), END)
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, *CHAT_TOKENS)
"""Every special token, in the order a trained tokenizer gives them ids 0, 1, 2, …"""

STOP_TOKENS: tuple[str, ...] = (END, EOS)
"""Tokens that end a generated reply (``<|end|>`` in chat, ``<|eos|>`` after plain text)."""

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '" + SYSTEM + "\\n' + message['content'] + '" + END + "\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '" + USER + "\\n' + message['content'] + '" + END + "\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '" + ASSISTANT + "\\n' -}}"
    "{%- generation -%}{{- message['content'] + '" + END + "' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "\\n' -}}{%- endif -%}"
)
"""The Jinja chat template (Hugging Face conventions: ``messages``, ``bos_token``, ``add_generation_prompt``)."""

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_assistant_markers(template: str | None) -> bool:
    """Whether a chat template marks assistant tokens, which SFT's loss mask needs."""
    return bool(template) and _GENERATION_BLOCK.search(template) is not None

