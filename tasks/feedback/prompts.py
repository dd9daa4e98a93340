"""The conversations the feedback stage asks a model to continue, formed from the constitution.

Supervised phase (SL-CAI): the prompt and the reply, then the principle's critique request as a
user turn; the model's critique, then the revision request; the model's answer is the revision.
A further round critiques the latest revision the same way, in a fresh conversation (short
contexts: every round sees the prompt and one reply, never the whole history).

Preference phase (RL-CAI): one user turn holding the conversation so far, the principle's
comparison question and the two replies as options ``(A)`` and ``(B)``; the judge's answer is
read from the log-probabilities of the replies ``(A)`` and ``(B)`` (``tasks/feedback/judge.py``).
"""

from __future__ import annotations

from tasks.data.chat_data import Message
from tasks.feedback.constitution import Principle

CHOICES = ("(A)", "(B)")
"""The judge's two answers: the first option, the second option."""


def critique_conversation(prompt: list[Message], reply: str, principle: Principle) -> list[Message]:
    """The prompt, the reply, and the critique request."""
    return [*prompt, {"role": "assistant", "content": reply}, {"role": "user", "content": principle.critique}]


def revision_conversation(prompt: list[Message], reply: str, critique: str, principle: Principle) -> list[Message]:
    """The critique conversation, the critique, and the revision request."""
    return [
        *critique_conversation(prompt, reply, principle),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision},
    ]


def transcript(prompt: list[Message]) -> str:
    """A conversation as plain text, one ``Human:``/``Assistant:`` line per turn (the system prompt first)."""
    speaker = {"system": "System", "user": "Human", "assistant": "Assistant"}
    return "\n".join(f"{speaker[m['role']]}: {m['content']}" for m in prompt)


def choice_conversation(prompt: list[Message], first: str, second: str, principle: Principle) -> list[Message]:
    """The judge's multiple-choice question: which of ``first`` (A) and ``second`` (B) is better."""
    text = (
        "Consider the following conversation between a human and an assistant:\n"
        f"{transcript(prompt)}\n"
        f"{principle.comparison}\n"
        "Options:\n"
        f"{CHOICES[0]} {first}\n"
        f"{CHOICES[1]} {second}\n"
        "The answer is:"
    )
    return [{"role": "user", "content": text}]
