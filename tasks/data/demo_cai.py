"""Constitutional AI exercises for the demo's SFT set: critique, revise and judge, on training prompts.

The ``feedback`` stage asks the SFT model to critique its own reply, revise it, and pick the
better of two replies (``tasks/feedback/prompts.py``). A 1.3M-parameter model never shown such
conversations cannot do any of it, so the demo's SFT set holds worked examples formed with
exactly those functions and the principles of ``configs/constitution.yaml``:

- **revision exercises**: ``revision_conversation(prompt, reply, critique, principle)`` followed
  by the revised reply. Every one also teaches the critique (an assistant turn inside it). Half
  critique a bad reply ("The response helps with …") and revise it into the good one; half find
  a good reply fine and give it again, so the model does not learn to change what needs no fix.
- **judge exercises**: ``choice_conversation(prompt, first, second, principle)`` answered
  ``(A)`` or ``(B)``; the good reply is first in exactly half of them, so no position is taught.

Each exercise draws its principle at random, as the stage does; a critique names the reply's real
problem whichever principle asked. The bad reply of a revision exercise carries ``"weight": 0``: the
model reads it as the thing to critique and is never taught to write it.
An exercise longer than ``MAX_CHARS`` is dropped, never cut (the demo's context is 256 tokens).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.chat_data import Message
from tasks.feedback.constitution import Constitution, Principle, load_constitution
from tasks.feedback.prompts import CHOICES, choice_conversation, revision_conversation

CONSTITUTION = Path(__file__).resolve().parents[2] / "configs" / "constitution.yaml"
MAX_CHARS = 560
"""Characters of message text an exercise may hold. The demo tokenizer averages ~2.4 characters a
token on these texts (measured), so that is ~235 tokens with the chat markers: under 256."""


@dataclass(frozen=True)
class Case:
    """A training prompt, a good and a bad reply to it, and what a critique of each says."""

    key: str  # the split key of the example family it comes from (``demo_chat.held_out``)
    id: str
    prompt: str
    good: str
    bad: str
    flaw: str  # the critique of the bad reply
    fine: str  # the critique of the good reply: "The response is fine: …"


def constitution() -> Constitution:
    return load_constitution(CONSTITUTION)


def _principle(principles: Sequence[Principle], key: str) -> Principle:
    return random.Random(key).choice(principles)


def chars(messages: list[Message]) -> int:
    return sum(len(m["content"]) for m in messages)


def revision_exercise(case: Case, bad: bool, principle: Principle) -> list[Message]:
    """The bad (or good) reply critiqued and revised into the good one."""
    reply, critique = (case.bad, case.flaw) if bad else (case.good, case.fine)
    prompt = [{"role": "user", "content": case.prompt}]
    messages = [*revision_conversation(prompt, reply, critique, principle), {"role": "assistant", "content": case.good}]
    if bad:  # the flawed reply is context to critique, never a target: weight 0 keeps it out of the loss
        messages[len(prompt)] = {**messages[len(prompt)], "weight": 0}
    return messages


def judge_exercise(case: Case, good_first: bool, principle: Principle) -> list[Message]:
    """The multiple-choice question over the two replies, answered with the good one's label."""
    first, second = (case.good, case.bad) if good_first else (case.bad, case.good)
    prompt = [{"role": "user", "content": case.prompt}]
    answer = CHOICES[0] if good_first else CHOICES[1]
    return [*choice_conversation(prompt, first, second, principle), {"role": "assistant", "content": answer}]


Build = Callable[[Case, bool, Principle], list[Message]]
Rows = Iterator[tuple[str, dict[str, Any]]]


def _alternating(cases: Sequence[Case], kind: str, build: Build, principles: Sequence[Principle]) -> Rows:
    """(split key, chat row): one exercise per case, the flag alternating over the exercises kept
    (a dropped one does not shift the balance)."""
    flag = True
    for case in cases:
        messages = build(case, flag, _principle(principles, f"{case.id}/{kind}"))
        if chars(messages) <= MAX_CHARS:
            yield case.key, {"id": f"cai/{kind}/{case.id}", "messages": messages}
            flag = not flag


def revision_rows(cases: Sequence[Case], principles: Sequence[Principle]) -> Rows:
    """The first kept case revises its bad reply, the next keeps its good one, and so on."""
    return _alternating(cases, "revise", revision_exercise, principles)


def judge_rows(cases: Sequence[Case], principles: Sequence[Principle]) -> Rows:
    """The good reply as (A) and as (B) in turn."""
    return _alternating(cases, "judge", judge_exercise, principles)
