"""A checkpoint under evaluation: log-likelihoods, rolling perplexity windows, generation, judging.

Models are Hugging Face folders (``config.json`` + safetensors + tokenizer), so a Crucible
checkpoint and an open-weight baseline go through exactly the same code. Conventions follow
EleutherAI's lm-eval-harness, so numbers are comparable with it:

- a whole text (perplexity) or a continuation with an empty context is scored after one *prefix
  token*: the EOS (Crucible packs pretraining documents as ``text <|eos|> text …``, so EOS is
  what precedes a document), else the BOS; lm-eval takes the same with
  ``prefix_token_id=<eos id>``;
- a (context, continuation) pair is tokenised as a whole, the context's trailing whitespace
  moved onto the continuation, and the continuation is the tokens past the context's;
  plain-text prompts are tokenised as they are;
- sequences longer than the model's window keep their right end (the scored tokens).

Chat models get generation prompts through their tokenizer's chat template; replies stop at the
tokenizer's EOS and at Crucible's ``<|end|>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.chat import STOP_TOKENS
from models.heads import reward_model_from, sequence_rewards


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a Hugging Face folder (weights, config, tokenizer)."""

    name: str
    path: str
    chat: bool  # prompts go through the chat template
    stage: str | None = None  # the pipeline stage that produced it ("untrained" for the floor); None for a baseline
    init_seed: int | None = None  # set: the folder's architecture with fresh weights from this seed, not its trained ones


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


Prompt = str | list[dict[str, str]]
"""One user turn, or a conversation (``{"role", "content"}`` messages) ending with a user turn."""


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def as_text(prompt: Prompt) -> str:
    """A prompt for a model without a chat template: the text, or the turns' contents one after another."""
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


def render_conversation(tokenizer, prompt: Prompt, reply: str) -> str:
    """The prompt and the reply through the chat template, ending at the reply's ``<|end|>``
    (the template's trailing newline dropped), as the post-training stages render it."""
    messages = [*as_messages(prompt), {"role": "assistant", "content": reply}]
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")


def _untrained(path: str, seed: int, dtype: torch.dtype):
    """The architecture in ``path`` with fresh weights from its own initialiser, seeded: no training at all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).to(dtype)


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class LanguageModel:
    """A causal LM with the scoring and sampling primitives the suites need."""

    def __init__(self, spec: ModelSpec, device: str = "auto", batch_size: int = 8, max_length: int | None = None):
        from transformers import AutoModelForCausalLM

        self.spec = spec
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(spec.path)
        self.model = _untrained(spec.path, spec.init_seed, _dtype(self.device)) if spec.init_seed is not None else (
            AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True, dtype=_dtype(self.device))
        )
        self.model.to(self.device).eval()
        window = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = min(max_length, window) if max_length else window
        tok = self.tokenizer
        self.prefix_id = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        vocab = tok.get_vocab()
        self.stop_ids = sorted({tok.eos_token_id, *(vocab[t] for t in STOP_TOKENS if t in vocab)} - {None})

    # ------------------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: Prompt, chat: bool) -> list[int]:
        """Token ids that generation continues: the chat template's assistant header, or the text."""
        if chat and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
            return self.encode(text)
        return self.encode(as_text(prompt)) or [self.prefix_id]

    def reply_ids(self, prompt: Prompt, reply: str, chat: bool) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) as post-training renders them: a chat model's reply runs through
        its closing ``<|end|>``; a plain model reads ``prompt``, a blank line, then ``reply``."""
        if chat and self.tokenizer.chat_template:
            head = self.prompt_ids(prompt, chat=True)
            whole = self.encode(render_conversation(self.tokenizer, prompt, reply))
            if whole[: len(head)] == head:
                return head, whole[len(head) :]
            return head, self.encode(reply)
        return self.encode(f"{as_text(prompt)}\n\n") or [self.prefix_id], self.encode(reply)

    # ------------------------------------------------------------------------------ scoring

    def reply_logprobs(self, prompts: Sequence[Prompt], replies: Sequence[str], chat: bool) -> list[float]:
        """log p(reply | prompt), summed over the reply's tokens (see ``reply_ids``)."""
        sequences, scored = [], []
        for prompt, reply in zip(prompts, replies):
            head, tail = self.reply_ids(prompt, reply, chat)
            sequence = (head + tail)[-self.max_length :]
            sequences.append(sequence)
            scored.append(min(len(tail), len(sequence) - 1))
        return self._tail_logprobs(sequences, scored)

    @torch.no_grad()
    def _tail_logprobs(self, sequences: Sequence[list[int]], scored: Sequence[int]) -> list[float]:
        """Sum of log p(token | everything before it) over the last ``scored[i]`` tokens of each sequence."""
        out = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs, mask = _pad([sequences[i][:-1] for i in chunk], self.tokenizer.pad_token_id, left=False)
            logits = self.model(input_ids=inputs.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                length, n = len(sequences[i]) - 1, scored[i]
                targets = torch.tensor(sequences[i][-n:], device=self.device)
                out[i] = logp[row, length - n : length].gather(-1, targets[:, None]).sum().item()
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(log p(continuation | context), continuation tokens) for each (context, continuation)."""
        sequences, scored = [], []
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context:
                whole = self.encode(context + continuation)
                n = len(whole) - len(self.encode(context))
            else:
                whole = [self.prefix_id, *self.encode(continuation)]
                n = len(whole) - 1
            if n < 1:
                raise ValueError(f"empty continuation after context {context[-40:]!r}")
            sequence = whole[-(self.max_length + 1) :]
            sequences.append(sequence)
            scored.append(min(n, len(sequence) - 1))
        return list(zip(self._tail_logprobs(sequences, scored), scored))

    def rolling_loglikelihood(self, texts: Sequence[str], stride: int | None = None) -> list[tuple[float, int]]:
        """(log p(text), tokens) of whole texts, every token scored once.

        A text longer than the window is scored ``stride`` tokens at a time, each block with as
        much preceding text as the window holds (``stride`` = window: disjoint blocks; smaller
        strides give every block more context at more compute).
        """
        step = min(stride or self.max_length, self.max_length)
        sequences, scored, owner = [], [], []
        for i, text in enumerate(texts):
            ids = [self.prefix_id, *self.encode(text)]
            first = 1  # the prefix token is never scored
            while first < len(ids):
                end = min(first + step, len(ids))
                sequences.append(ids[max(0, end - 1 - self.max_length) : end])
                scored.append(end - first)
                owner.append(i)
                first = end
        totals = [[0.0, 0] for _ in texts]
        for logprob, n, i in zip(self._tail_logprobs(sequences, scored), scored, owner):
            totals[i][0] += logprob
            totals[i][1] += n
        return [(logprob, n) for logprob, n in totals]

    # ------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        chat: bool,
        max_new_tokens: int,
        samples: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int = 0,
    ) -> list[list[str]]:
        """``samples`` replies per prompt: greedy when ``temperature`` is 0, else sampled."""
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        room = max(1, self.max_length - max_new_tokens)
        replies: list[list[str]] = []
        per_batch = max(1, self.batch_size // samples)
        for start in range(0, len(prompts), per_batch):
            rows = [self.prompt_ids(p, chat)[-room:] for p in prompts[start : start + per_batch]]
            ids, mask = _pad(rows, self.tokenizer.pad_token_id, left=True)
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens, num_return_sequences=samples,
                eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id, **sampling,
            )
            texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            texts = [cut_at_stop(t, stop) for t in texts]
            replies.extend(texts[i : i + samples] for i in range(0, len(texts), samples))
        return replies


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


class RewardJudge:
    """A reward model (``models/heads.py``: one-logit sequence classifier) scoring replies to prompts.

    A (prompt, reply) is rendered as the conversation the reward stage trained on: the chat
    template's user turn, the assistant header, the reply and its closing ``<|end|>``, with the
    template's trailing newline dropped so the score is read at the ``<|end|>`` token.
    """

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8):
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(path)
        self.model = reward_model_from(path, self.tokenizer.pad_token_id, dtype=_dtype(self.device)).to(self.device).eval()
        self.max_length = getattr(self.model.config, "max_position_embeddings", None) or 2048

    def render(self, prompt: str, reply: str) -> list[int]:
        tok = self.tokenizer
        text = render_conversation(tok, prompt, reply) if tok.chat_template else f"{prompt}\n\n{reply}"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length :]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        rows = [self.render(p, r) for p, r in zip(prompts, replies)]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = _pad(rows[start : start + self.batch_size], self.tokenizer.pad_token_id, left=True)
            scores.extend(sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)).tolist())
        return scores
