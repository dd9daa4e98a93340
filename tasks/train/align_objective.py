"""The torch side of the ``align`` stage: the method's objective and the models it needs.

Kept apart from ``align.py`` (the stage's config and declaration), which the registry imports,
so that loading torch and transformers waits until the stage runs. The objectives themselves
are in ``dpo.py``, ``grpo.py``, ``ppo.py`` and ``sft_objective.py``.
"""

from __future__ import annotations

from transformers import AutoConfig

from models.heads import PolicyWithValueHead
from tasks.errors import StageError
from tasks.train.align import AlignConfig
from tasks.train.dpo import DPO
from tasks.train.grpo import GRPO
from tasks.train.objectives import Objective
from tasks.train.post_stage import load_causal_lm, materialize
from tasks.train.ppo import PPO
from tasks.train.rollout import Sampling, Scorer
from tasks.train.sft_objective import AssistantTokens


def policy_with_value_head(path: str) -> PolicyWithValueHead:
    """PPO's trained module: the causal LM at ``path`` with a fresh value head."""
    return PolicyWithValueHead(load_causal_lm(path))


def check_reward_model(policy: str, reward_model: str) -> None:
    """The reward model scores the policy's token ids, so both must share one vocabulary."""
    vocab = {p: AutoConfig.from_pretrained(materialize(p), local_files_only=True).vocab_size for p in (policy, reward_model)}
    if vocab[policy] != vocab[reward_model]:
        raise StageError(f"align: the reward model's vocabulary ({vocab[reward_model]}) differs from the policy's ({vocab[policy]})")


def training_sampling(cfg: AlignConfig) -> Sampling:
    """How grpo/ppo sample replies, in training and in the sampled held-out measure."""
    s = cfg.sampling
    return Sampling(s.max_new_tokens, s.temperature, s.top_k, s.top_p)


def method_objective(cfg: AlignConfig, sft: str | None, scorer: Scorer | None) -> Objective:
    """The objective of ``cfg.method``, with the SFT model at ``sft`` as its frozen reference
    (None: the policy's own base weights, under LoRA)."""
    if cfg.method == "sft":
        return AssistantTokens()
    if cfg.method == "dpo":
        return DPO(sft, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.nll_weight)
    sampling = training_sampling(cfg)
    if cfg.method == "grpo":
        g = cfg.grpo
        return GRPO(scorer, sampling, sft, group_size=g.group_size, beta=g.beta, clip=g.clip,
                    scale_rewards=g.scale_rewards, stop_penalty=cfg.stop_penalty)
    return PPO(scorer, sampling, sft, cfg.ppo, cfg.grad_accum, stop_penalty=cfg.stop_penalty)
