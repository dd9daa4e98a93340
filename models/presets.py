"""Decoder-only model presets: Hugging Face Llama architectures (RoPE, RMSNorm, SwiGLU).

Presets are plain ``LlamaConfig`` keyword sets, so every model Crucible trains is a stock
``LlamaForCausalLM`` that ``transformers``, vLLM, lm-eval and peft load without custom code.
Sizes follow the usual GPT-2 / Llama ladder; SwiGLU widths are ~8/3 of the hidden size rounded
up to a multiple of 256 (128 for the small ones), the convention Llama uses.

- ``tiny``: tests; trains in seconds on one CPU core.
- ``demo``: 1.3M parameters at the demo's 4k vocabulary (4.9M at 32k); learns visibly in a
  few minutes on 2 CPU cores, so the whole demo (pre-training to alignment) fits in minutes.
- ``124m`` / ``350m`` / ``1b``: GPU sizes (GPT-2 small / medium, Llama-3.2-1B shape).
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # transformers takes seconds to import: only the functions that need it do
    from transformers import LlamaConfig, LlamaForCausalLM

PresetName = Literal["tiny", "demo", "124m", "350m", "1b"]

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",  # SwiGLU MLP
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "demo": {
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    },
    "124m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "350m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}


@cache
def _config_fields() -> frozenset[str]:
    from transformers import LlamaConfig

    return frozenset(inspect.signature(LlamaConfig.__init__).parameters) - {"self"}


def model_config(preset: PresetName, vocab_size: int, **overrides: Any) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset; ``overrides`` are any ``LlamaConfig`` fields.

    Unknown preset names and unknown override keys are errors: a typo must not silently
    train a different model.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}' (known: {', '.join(PRESETS)})")
    from transformers import LlamaConfig

    unknown = sorted(set(overrides) - _config_fields())
    if unknown:
        raise ValueError(f"unknown LlamaConfig field(s) in overrides: {', '.join(unknown)}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return LlamaConfig(vocab_size=vocab_size, **{**_COMMON, **PRESETS[preset], **overrides})


def build_model(preset: PresetName, vocab_size: int, **overrides: Any) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` of the preset (fp32; the trainer casts)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(model_config(preset, vocab_size, **overrides))
