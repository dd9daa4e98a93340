"""An AI judge: which of two replies better follows a principle, read from label log-probabilities.

The judge (any causal LM; its chat template when it has one) answers the multiple-choice prompt of
``tasks/feedback/prompts.py``. Its preference for option A is ``softmax(log p("(A)"), log p("(B)"))``
— no sampling, no parsing. Models favour a position, so every pair is asked in both orders and
the two answers averaged: ``p(x better) = (P(A | x first) + P(B | x second)) / 2``. Swapping
``x`` and ``y`` gives exactly ``1 - p``, whatever the judge's position bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tasks.data.chat_data import Message
from tasks.feedback.constitution import Principle
from tasks.feedback.prompts import CHOICES, choice_conversation

if TYPE_CHECKING:  # torch-heavy: loaded where the model runs
    from tasks.eval.lm import LanguageModel


def _first_wins(logp_first: float, logp_second: float) -> float:
    """softmax over the two labels: the probability of the first."""
    return 1.0 / (1.0 + math.exp(logp_second - logp_first))


def confidence(p_first: float) -> float:
    """How sure a verdict is: the probability of the reply it picks (0.5 = a coin flip, 1 = certain)."""
    return max(p_first, 1.0 - p_first)


class PrincipleJudge:
    """``prefer`` scores reply pairs under principles with one batched forward per ``batch_size`` rows."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.chat = bool(lm.tokenizer.chat_template)

    def prefer(
        self, prompts: Sequence[list[Message]], firsts: Sequence[str], seconds: Sequence[str], principles: Sequence[Principle]
    ) -> list[float]:
        """For each row, the probability that ``firsts[i]`` is the better reply, both orders averaged."""
        questions, labels = [], []
        for prompt, x, y, principle in zip(prompts, firsts, seconds, principles):
            for a, b in ((x, y), (y, x)):
                question = choice_conversation(prompt, a, b, principle)
                questions += [question, question]
                labels += list(CHOICES)
        logp = self.lm.reply_logprobs(questions, labels, chat=self.chat)
        out = []
        for i in range(0, len(logp), 4):
            x_first = _first_wins(logp[i], logp[i + 1])  # P(A) with x as option A
            x_second = 1.0 - _first_wins(logp[i + 2], logp[i + 3])  # P(B) with x as option B
            out.append((x_first + x_second) / 2.0)
        return out
