"""Sampling replies from a policy and reading them back as token tensors.

Prompts are left-padded, so every reply starts at the same column ``P``; a rollout row is
``[pad… prompt | reply … pad…]``. The reply mask covers the generated tokens up to and
including the first stop token (``<|end|>``/``<|eos|>``): the policy is trained to stop, and
nothing after the stop counts. Position ids always follow the attention mask, so a row's
log-probs do not depend on how much padding its batch needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationConfig

from models.chat import STOP_TOKENS
from models.heads import positions, reward_model_from, sequence_rewards
from tasks.train.lora import base_weights
from tasks.train.objectives import Objective
from tasks.train.post_data import decode_answers
from tasks.train.post_objectives import token_logprobs
from tasks.train.post_stage import eval_device, frozen, load_causal_lm, materialize, on_device
from tasks.train.rewards import VERIFIERS


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (FSDP2 shards in place and needs none)."""
    return getattr(model, "module", model)


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")
"""End-of-turn markers of common open-weight chat templates (ChatML/Qwen, Llama 3, Gemma, GPT-2)."""


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens that end a reply, among those the tokenizer has: Crucible's, the EOS, and
    the end-of-turn marker of an open-weight template when it is one of the tokenizer's special tokens."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
    ids += [vocab[t] for t in END_OF_TURN if t in special and t in vocab and vocab[t] not in ids]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class Rollout:
    sequences: torch.Tensor  # [N, P + R] prompt (left-padded) and reply (right-padded)
    attention_mask: torch.Tensor  # [N, P + R] 1 on prompt and reply tokens
    response_mask: torch.Tensor  # [N, P + R] 1 on reply tokens up to and including the stop
    prompt_length: int  # P

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False


def generate(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
    stop_ids: list[int], pad_id: int,
) -> Rollout:
    """Sample one reply per row (no gradients; the model is put back in its training mode).

    Under several workers every rank keeps stepping until the last rank's replies have all
    stopped (``synced_gpus``): sharded weights (FSDP, ZeRO-3) are gathered by a collective in
    every forward, so a rank that stopped early would leave the others waiting for ever.
    """
    policy = unwrap(model)
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not sampling.greedy,
        temperature=sampling.temperature if not sampling.greedy else None,
        top_k=sampling.top_k if not sampling.greedy else None,
        top_p=sampling.top_p if not sampling.greedy else None,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        sequences = policy.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            synced_gpus=dist.is_initialized() and dist.get_world_size() > 1,
        )
    policy.train(was_training)
    prompt_length = input_ids.shape[1]
    reply = sequences[:, prompt_length:]
    is_stop = torch.isin(reply, torch.tensor(stop_ids, device=reply.device))
    before_or_at_stop = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    response_mask = torch.cat([torch.zeros_like(input_ids), before_or_at_stop.long()], dim=1)
    attention = torch.cat([attention_mask.long(), before_or_at_stop.long()], dim=1)
    sequences = torch.where(attention.bool(), sequences, torch.full_like(sequences, pad_id))
    return Rollout(sequences, attention, response_mask, prompt_length)


def reply_texts(tokenizer: Any, rollout: Rollout) -> list[str]:
    """The replies as text, special tokens (the stop) left out."""
    out = []
    for row, mask in zip(rollout.sequences.tolist(), rollout.response_mask.tolist()):
        out.append(tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True))
    return out


def causal_logits(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The LM's logits on rollout rows (left- or right-padded)."""
    return model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False).logits


# ---------------------------------------------------------------------------------- RL objectives


class Scorer:
    """Rewards for sampled replies: the reward model's score at the reply's last token, or a
    verifier (``tasks/train/rewards.py``) checking the reply against the prompt's answer."""

    def __init__(self, tokenizer: Any, reward: str, reward_model_path: str | None):
        if reward == "model" and reward_model_path is None:
            raise ValueError("reward 'model' needs a reward model")
        if reward != "model" and reward not in VERIFIERS:
            raise ValueError(f"unknown reward '{reward}' (model, {', '.join(VERIFIERS)})")
        self.tokenizer, self.reward, self.reward_model_path = tokenizer, reward, reward_model_path
        self.reward_model: nn.Module | None = None

    def __getstate__(self) -> dict:  # each process loads its own reward model
        return {**self.__dict__, "reward_model": None}

    def load(self, device: torch.device) -> None:
        if self.reward == "model":
            model = reward_model_from(materialize(self.reward_model_path), self.tokenizer.pad_token_id)
            self.reward_model = frozen(model, device)

    def __call__(self, rollout: Rollout, answers: list[str | None]) -> torch.Tensor:
        if self.reward == "model":
            with torch.no_grad():
                return sequence_rewards(self.reward_model, rollout.sequences, rollout.attention_mask)
        verify = VERIFIERS[self.reward]
        replies = reply_texts(self.tokenizer, rollout)
        return torch.tensor([verify(r, a) for r, a in zip(replies, answers)], device=rollout.sequences.device)


def sample_and_score(
    model: nn.Module, batch: dict[str, torch.Tensor], copies: int, sampling: Sampling, scorer: Scorer
) -> tuple[Rollout, torch.Tensor]:
    """``copies`` replies to each prompt of ``batch`` (consecutive rows) and their float scores."""
    ids = batch["input_ids"].repeat_interleave(copies, 0)
    attention = batch["attention_mask"].repeat_interleave(copies, 0)
    answers = [a for a in decode_answers(batch["answer_bytes"].cpu()) for _ in range(copies)]
    tokenizer = scorer.tokenizer
    rollout = generate(model, ids, attention, sampling, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    return rollout, scorer(rollout, answers).float()


@dataclass
class Experience:
    """Sampled replies with their rewards and the frozen reference's token log-probs."""

    rollout: Rollout
    rewards: torch.Tensor  # [N] one scalar per reply
    ref_logprobs: torch.Tensor  # [N, P + R]
    stopped: torch.Tensor  # [N] 1 where the reply ended with a stop token


class RolloutObjective(Objective):
    """What GRPO and PPO share: sample replies, score them, keep the reference's log-probs.

    The reference (the SFT model) and the reward model live on every Ray Train worker next to the
    policy, frozen; with LoRA (``reference_path`` None) the reference is the policy itself with its
    adapters switched off. ``stop_penalty`` is subtracted from replies that ran out of tokens before
    stopping.
    """

    def __init__(self, scorer: Scorer, sampling: Sampling, reference_path: str | None, stop_penalty: float = 0.0):
        self.scorer, self.sampling, self.reference_path, self.stop_penalty = scorer, sampling, reference_path, stop_penalty
        self.stop_ids = stop_token_ids(scorer.tokenizer)
        self.reference: nn.Module | None = None

    def __getstate__(self) -> dict:  # workers load their own frozen reference
        return {**self.__dict__, "reference": None}

    def prepare(self, device: torch.device) -> None:
        if self.reference_path is not None:
            self.reference = frozen(load_causal_lm(self.reference_path), device)
        self.scorer.load(device)

    def experience(self, model: nn.Module, batch: dict[str, torch.Tensor], copies: int = 1) -> Experience:
        """Sample ``copies`` replies per prompt of ``batch`` (consecutive rows), score them, get reference log-probs."""
        rollout, scores = sample_and_score(model, batch, copies, self.sampling, self.scorer)
        reply = rollout.sequences * rollout.response_mask
        stopped = torch.isin(reply, torch.tensor(self.stop_ids, device=reply.device)).any(-1).float()
        rewards = scores - self.stop_penalty * (1.0 - stopped)
        with torch.no_grad():
            ref_logprobs = token_logprobs(self._reference_logits(model, rollout), rollout.sequences)
        return Experience(rollout, rewards, ref_logprobs, stopped)


    def _reference_logits(self, model: nn.Module, rollout: Rollout) -> torch.Tensor:
        if self.reference is not None:
            return causal_logits(self.reference, rollout.sequences, rollout.attention_mask)
        mask = rollout.attention_mask
        with base_weights(model):  # the whole training module runs: sharded strategies need every rank's forward
            out = model(input_ids=rollout.sequences, attention_mask=mask, position_ids=positions(mask))
        return out[0] if isinstance(out, tuple) else out.logits


def generation_metrics(
    policy_path: str, scorer: Scorer, examples: Any, max_new_tokens: int, batch_size: int,
    sampling: Sampling | None = None, samples: int = 0, seed: int = 0,
) -> dict[str, float]:
    """Replies to every prompt of ``examples`` (a ``PromptExamples``): mean reward and reply length
    of the greedy replies, and of ``samples`` replies per prompt drawn with ``sampling`` (the
    training distribution, seeded, so two policies are compared on the same random draws); exact
    match (the share of replies the verifier accepts) where the reward is a verifier.

    Greedy replies are what a user gets; on a small held-out split they flip on near-ties, so the
    sampled replies measure the same policy with less noise.
    """
    device = eval_device()
    policy = frozen(load_causal_lm(policy_path), device)
    scorer.load(device)

    def mean_reward_and_length(how: Sampling, copies: int) -> tuple[float, float]:
        total_reward, total_length, count = 0.0, 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = on_device(examples.collate(range(start, min(start + batch_size, len(examples)))), device)
            rollout, rewards = sample_and_score(policy, batch, copies, how, scorer)
            total_reward += rewards.sum().item()
            total_length += rollout.response_lengths.sum().item()
            count += rewards.numel()
        return total_reward / count, total_length / count

    reward, length = mean_reward_and_length(Sampling(max_new_tokens, greedy=True), 1)
    out = {"heldout/reward": reward, "heldout/response_length": length}
    if sampling is not None and samples > 0:
        torch.manual_seed(seed)
        out["heldout/sampled_reward"], _ = mean_reward_and_length(sampling, samples)
    if scorer.reward != "model":
        out["heldout/exact_match"] = out["heldout/reward"]
        if "heldout/sampled_reward" in out:
            out["heldout/sampled_exact_match"] = out["heldout/sampled_reward"]
    return out
