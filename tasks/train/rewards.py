"""Verifiable rewards: score a reply by checking it against a known answer, no reward model needed.

``arithmetic``: the reply's final answer (the number after "The answer is", else the last
number in the reply) must equal the reference. The demo's arithmetic problems
(``tasks/data/demo_chat.py``) end their worked solutions that way.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ANSWER = re.compile(r"answer is\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(reply: str) -> str | None:
    """The number a reply gives as its answer, normalised (no thousands separators), or None."""
    found = _ANSWER.findall(reply) or _NUMBER.findall(reply)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def arithmetic_reward(reply: str, answer: str | None) -> float:
    """1.0 when the reply's final answer equals ``answer``, else 0.0 (also when there is no answer)."""
    if answer is None:
        return 0.0
    return 1.0 if final_answer(reply) == final_answer(answer) else 0.0


VERIFIERS: dict[str, Callable[[str, str | None], float]] = {"arithmetic": arithmetic_reward}
