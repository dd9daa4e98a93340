"""The torch side of the ``sft`` stage: its objective and the held-out evaluations run on a worker.

Kept apart from ``sft.py`` (the stage's config and declaration), which the registry imports, so
that loading torch waits until the stage runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasks.train.objectives import Objective, ObjectiveOutput
from tasks.train.post_data import IGNORE, ChatExamples, encode_prompt
from tasks.train.post_stage import eval_device, load_causal_lm, on_device
from tasks.train.rollout import Sampling, generate, reply_texts, stop_token_ids


class AssistantTokens(Objective):
    """Next-token loss where ``labels`` are not -100: the assistant's tokens.

    Packed rows carry ``position_ids`` and no attention mask, so ``transformers`` masks attention
    per conversation; ``use_cache=False`` keeps it from building a KV cache, which would turn that
    detection off.
    """

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"), labels=labels, use_cache=False,
        )
        return ObjectiveOutput(loss=out.loss, tokens=(labels[:, 1:] != IGNORE).sum())


def assistant_loss(model_path: str, examples: ChatExamples, batch_size: int, vocab_size: int | None = None) -> float:
    """Token-weighted assistant-token loss of the model at ``model_path`` over every example."""
    device = eval_device()
    model = load_causal_lm(model_path, vocab_size).to(device).eval()
    objective = AssistantTokens()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = on_device(examples.collate(range(start, min(start + batch_size, len(examples)))), device)
            out = objective.compute(model, batch)
            total += out.loss.item() * int(out.tokens)
            tokens += int(out.tokens)
    return total / max(tokens, 1)


def held_out_samples(model_path: str, tokenizer: Any, conversations: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """Greedy replies to the last user turn of each conversation, next to the reference reply."""
    device = eval_device()
    model = load_causal_lm(model_path).to(device).eval()
    rows = []
    for messages in conversations:
        prompt = messages[:-1]
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
        rollout = generate(
            model, ids, torch.ones_like(ids), Sampling(max_new_tokens, greedy=True),
            stop_token_ids(tokenizer), tokenizer.pad_token_id,
        )
        rows.append({"prompt": prompt[-1]["content"], "reference": messages[-1]["content"], "reply": reply_texts(tokenizer, rollout)[0]})
    return rows
