"""Parameter counts and training FLOPs per token, from a model config alone.

Model FLOPs utilisation (MFU) compares the FLOPs a step *must* do with what the hardware could
do. We use the PaLM convention (Chowdhery et al. 2022, appendix B) so figures compare with
published ones: per token, training costs ``6 N`` for the weight matmuls (forward 2N, backward
4N), where N counts every matmul weight including the LM head (tied or not) but not the
embedding lookup or the norms, plus ``12 · layers · (heads · head_dim) · seq_len`` for the
attention scores and the weighted sum (not halved for the causal mask). Activation
recomputation is not counted: it is overhead, not useful work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig


def _head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_matmul_params(config: LlamaConfig) -> int:
    d, hd = config.hidden_size, _head_dim(config)
    q_out = config.num_attention_heads * hd
    kv_out = config.num_key_value_heads * hd
    attention = d * q_out + 2 * d * kv_out + q_out * d
    mlp = 3 * d * config.intermediate_size  # gate, up, down (SwiGLU)
    return attention + mlp


def parameter_count(config: LlamaConfig) -> int:
    """Number of parameters of ``LlamaForCausalLM(config)`` (tied weights counted once)."""
    d, vocab = config.hidden_size, config.vocab_size
    per_layer = _layer_matmul_params(config) + 2 * d  # + input and post-attention RMSNorm
    head = 0 if config.tie_word_embeddings else vocab * d
    return vocab * d + config.num_hidden_layers * per_layer + d + head


def matmul_parameter_count(config: LlamaConfig) -> int:
    """The N of ``6N``: every weight that takes part in a matmul, the LM head included."""
    return config.num_hidden_layers * _layer_matmul_params(config) + config.vocab_size * config.hidden_size


def training_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """FLOPs of one forward + backward pass, per token, at sequence length ``seq_len``."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * _head_dim(config) * seq_len
    return 6.0 * matmul_parameter_count(config) + attention


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak FLOP/s."""
    if peak_flops_per_device <= 0 or devices <= 0:
        raise ValueError("peak FLOP/s and device count must be positive")
    return tokens_per_second * flops_per_token / (peak_flops_per_device * devices)
