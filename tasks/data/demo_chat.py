"""Demo post-training data from what every Python install has: nothing is downloaded.

Three kinds of examples, each with a stable held-out split (a hash of the example's key, so an
arithmetic problem or a function held out of SFT is held out of the preference and prompt sets
too; safety requests split by template, ``tasks/data/demo_safety.py``):

- **docstring Q&A**: "What does `json.dumps` do?" answered by the first paragraph of the
  function's docstring, for the public functions and classes of a fixed list of standard-library
  modules (whose source the demo corpus's ``code`` domain also holds).
- **arithmetic word problems** with one-step answers a checker can verify
  (``tasks/train/rewards.py``): "… 12 + 5 = 17. The answer is 17."
- **safety**: templated harmful requests refused, next to benign look-alikes sharing their words
  ("kill a frozen process on Linux") answered helpfully (``tasks/data/demo_safety.py``).

The SFT set also teaches what the ``feedback`` stage asks of the model: critiques, revisions and
(A)/(B) verdicts over training prompts of all three kinds (``tasks/data/demo_cai.py``).

Files (``write_demo_chat``): ``sft_{train,heldout}.jsonl`` (``messages``, some multi-turn, some
with a system prompt), ``preference_{train,heldout}.jsonl`` (``prompt``/``chosen``/``rejected``:
the right docstring vs other modules', the correct result vs wrong ones, refusal vs compliance
and help vs refusal; three rejected replies per training docstring or arithmetic prompt, one per
held-out prompt), ``prompts_{train,heldout}.jsonl`` (arithmetic ``prompt`` + ``answer`` for
PPO/GRPO) and ``feedback_prompts.jsonl`` (the feedback stage's red-team requests, their
look-alikes and ordinary training requests). Output is deterministic for a given Python version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tasks.data import demo_cai, demo_safety
from tasks.data.demo_cai import Case

HELD_OUT_FRACTION = 0.1
ARITHMETIC_PROBLEMS = 1500
ANSWER_CHARS = (20, 320)
TRAIN_REJECTED = 3  # rejected replies per training prompt (held-out prompts keep one)
MULTI_TURN_EVERY = 4  # every 4th docstring conversation continues with a second question
SYSTEM_EVERY = 3  # every 3rd conversation opens with a system prompt
CAI_REVISED = 40  # docstring and arithmetic training prompts (each) with a revision exercise
CAI_JUDGED = 30  # … with a judge exercise
CAI_ANSWER_CHARS = 160  # longest docstring answer in an exercise (two fit in one, with the critique)
FEEDBACK_ORDINARY = 36  # docstring and arithmetic training prompts (each) in the feedback prompt set

DOC_MODULES = (
    "base64", "bisect", "calendar", "collections", "copy", "csv", "difflib", "fnmatch", "functools",
    "glob", "gzip", "hashlib", "heapq", "html", "itertools", "json", "math", "operator", "os",
    "os.path", "pathlib", "random", "re", "shlex", "shutil", "statistics", "string", "struct",
    "tempfile", "textwrap", "time", "urllib.parse", "uuid", "zlib",
)
FUNCTION_QUESTIONS = (
    "What does `{name}` do?",
    "Explain what `{name}` does.",
    "What is `{name}` used for in Python?",
    "Briefly describe the function `{name}`.",
)
CLASS_QUESTIONS = (
    "What is `{name}`?",
    "Explain the class `{name}`.",
    "What is `{name}` used for in Python?",
    "Briefly describe `{name}`.",
)
FOLLOW_UP = "And `{name}`?"
SYSTEM_PROMPTS = (
    "You are a concise assistant for Python programmers.",
    "You are a helpful assistant. Answer briefly and accurately.",
)

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar", "Priya", "Sam", "Tara", "Yuki")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "cookies", "stamps", "shells", "cards")


def _key_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def held_out(key: str) -> bool:
    """Whether the example family named ``key`` is in the held-out split (stable, ~10%; a safety
    template by its category-stratified split)."""
    if key.startswith(demo_safety.PREFIX):
        return demo_safety.split(key) != "train"
    return _key_hash(key) < HELD_OUT_FRACTION


T = TypeVar("T")


def _hash_order(items: Iterable[T], key: Callable[[T], str], salt: str) -> list[T]:
    """``items`` in a stable pseudo-random order (for drawing subsets without a random state)."""
    return sorted(items, key=lambda item: _key_hash(key(item) + salt))


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[int(_key_hash(key) * len(options))]


# ---------------------------------------------------------------------------------- docstrings


@dataclass(frozen=True)
class DocAnswer:
    name: str  # dotted name as written in the question
    module: str
    is_class: bool
    answer: str


def first_paragraph(doc: str, min_chars: int = ANSWER_CHARS[0]) -> str | None:
    """The docstring's first descriptive paragraph on one line, or None when it has none.

    Signature lines (``name(args) -> result``) and examples are skipped; long paragraphs are
    cut after the last whole sentence that fits.
    """
    high = ANSWER_CHARS[1]
    for paragraph in doc.split("\n\n"):
        text = " ".join(paragraph.split())
        if not text or re.match(r"^[\w.]+\(.*\)(\s*->.*)?$", text) or ">>>" in text:
            continue
        if len(text) > high:
            sentences = re.findall(r".+?[.!?](?:\s|$)", text)
            text, cut = "", text
            for sentence in sentences:
                if len(text) + len(sentence) > high:
                    break
                text += sentence
            text = text.strip() or cut[:high].rsplit(" ", 1)[0] + "…"
        return text if len(text) >= min_chars else None
    return None


NATIVE_HOMES = {"os": "posix", "os.path": "genericpath"}  # where these modules' C/shared parts live


def own_doc(obj: Any) -> str:
    """The object's own docstring, cleaned: not one inherited from a base class."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _defined_in(obj: Any, module_name: str, real_name: str) -> bool:
    """True for the module's own objects (or its C accelerator's), not names it imports."""
    home = getattr(obj, "__module__", None)
    return (
        home in (None, module_name, real_name, NATIVE_HOMES.get(module_name))
        or home.startswith(module_name + ".")
        or home.lstrip("_") == module_name
    )


def docstring_answers() -> list[DocAnswer]:
    """Public functions and classes of ``DOC_MODULES`` with a usable docstring, sorted by name.

    An answer shared by several names (aliases, twins like ``TemporaryFile``) is kept for the
    first name only, so the same text never sits on both sides of the held-out split.
    """
    found: dict[str, DocAnswer] = {}
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            if not _defined_in(obj, module_name, module.__name__):
                continue
            paragraph = first_paragraph(own_doc(obj))
            if paragraph is None or (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            name = f"{module_name}.{attr}"
            found.setdefault(name, DocAnswer(name, module_name, inspect.isclass(obj), paragraph))
    seen: set[str] = set()
    unique = []
    for name in sorted(found):
        if found[name].answer not in seen:
            seen.add(found[name].answer)
            unique.append(found[name])
    return unique


def _question(item: DocAnswer, variant: int) -> str:
    options = CLASS_QUESTIONS if item.is_class else FUNCTION_QUESTIONS
    start = int(_key_hash(item.name) * len(options))
    return options[(start + variant) % len(options)].format(name=item.name)


# ---------------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class Problem:
    key: str
    question: str
    a: int
    b: int
    op: str
    result: int

    def solution(self, result: int | None = None) -> str:
        value = self.result if result is None else result
        return f"{self.a} {self.op} {self.b} = {value}. The answer is {value}."


def arithmetic_problems(count: int = ARITHMETIC_PROBLEMS, seed: int = 0) -> list[Problem]:
    """Distinct one-step word problems: single-digit addition, subtraction from up to 12, products
    up to 6 × 6. About 170 number facts under 1,500 wordings, so a held-out problem asks a fact
    the training set states in other words: small models can learn the facts, not just the format."""
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    while len(problems) < count:
        name, items, kind = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            question = f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?"
            op, result = "+", a + b
        elif kind == 1:
            a = rng.randint(2, 12)
            b = rng.randint(1, a - 1)
            question = f"{name} had {a} {items} and gave {b} of them away. How many {items} are left?"
            op, result = "-", a - b
        else:
            a, b = rng.randint(2, 6), rng.randint(2, 6)
            question = f"{name} buys {a} bags with {b} {items} in each bag. How many {items} is that in total?"
            op, result = "*", a * b
        key = f"math/{hashlib.sha1(question.encode()).hexdigest()[:12]}"
        problems.setdefault(question, Problem(key, question, a, b, op, result))
    return list(problems.values())


def wrong_result(problem: Problem) -> int:
    """A plausible wrong result: off by one to three, never negative, never the right one."""
    delta = 1 + int(_key_hash(problem.key + "/wrong") * 3)
    wrong = problem.result + delta if _key_hash(problem.key + "/sign") < 0.5 or problem.result - delta < 0 else problem.result - delta
    return wrong


def wrong_results(problem: Problem, count: int) -> list[int]:
    """``count`` distinct plausible wrong results, ``wrong_result`` first, then others off by one to three."""
    first = wrong_result(problem)
    nearby = [r for r in range(max(0, problem.result - 3), problem.result + 4) if r not in (problem.result, first)]
    return [first, *sorted(nearby, key=lambda r: _key_hash(f"{problem.key}/wrong/{r}"))][:count]


# ---------------------------------------------------------------------------------- assembling


def _with_system(key: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if int(_key_hash(key + "/system") * SYSTEM_EVERY) == 0:
        return [{"role": "system", "content": _pick(SYSTEM_PROMPTS, key)}, *messages]
    return messages


def _turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sft_examples() -> Iterator[tuple[str, dict[str, Any]]]:
    """(split key, row) for every SFT conversation."""
    docs = docstring_answers()
    for n, item in enumerate(docs):
        messages = _turn(_question(item, 0), item.answer)
        nxt = docs[n + 1] if n + 1 < len(docs) else None
        if n % MULTI_TURN_EVERY == 0 and nxt is not None and held_out(nxt.name) == held_out(item.name):
            messages += _turn(FOLLOW_UP.format(name=nxt.name), nxt.answer)
        yield item.name, {"id": f"doc/{item.name}", "messages": _with_system(item.name, messages)}
    for problem in arithmetic_problems():
        yield problem.key, {"id": problem.key, "messages": _with_system(problem.key, _turn(problem.question, problem.solution()))}
    yield from demo_safety.sft_rows()
    principles = demo_cai.constitution().principles
    docs, problems = _doc_cases(), _arithmetic_cases()
    judged = slice(CAI_REVISED, CAI_REVISED + CAI_JUDGED)
    yield from demo_cai.revision_rows(demo_safety.revision_cases() + problems[:CAI_REVISED] + docs[:CAI_REVISED], principles)
    yield from demo_cai.judge_rows(demo_safety.judge_cases() + problems[judged] + docs[judged], principles)


def _doc_cases() -> list[Case]:
    """Training docstring questions answered with the right docstring or another module's (both short)."""
    short = [d for d in docstring_answers() if not held_out(d.name) and len(d.answer) <= CAI_ANSWER_CHARS]
    cases = []
    for item in _hash_order(short, lambda d: d.name, "/cai")[: CAI_REVISED + CAI_JUDGED]:
        others = [d for d in short if d.module != item.module]
        other = others[int(_key_hash(item.name + "/cai-other") * len(others))]
        cases.append(Case(
            item.name, f"doc/{item.name}", _question(item, 1), item.answer, other.answer,
            flaw=f"The response describes something else, not `{item.name}`.",
            fine=f"The response is fine: it describes `{item.name}`.",
        ))
    return cases


def _arithmetic_cases() -> list[Case]:
    """Training word problems solved right and wrong."""
    train = [p for p in arithmetic_problems() if not held_out(p.key)]
    cases = []
    for problem in _hash_order(train, lambda p: p.key, "/cai")[: CAI_REVISED + CAI_JUDGED]:
        wrong, fact = wrong_result(problem), f"{problem.a} {problem.op} {problem.b} is {problem.result}"
        cases.append(Case(
            problem.key, problem.key, problem.question, problem.solution(), problem.solution(wrong),
            flaw=f"The response is wrong: {fact}, not {wrong}.", fine=f"The response is fine: {fact}.",
        ))
    return cases


def _suffix(n: int) -> str:
    return "" if n == 0 else f"/{n + 1}"


def preference_examples() -> Iterator[tuple[str, dict[str, Any]]]:
    """(split key, row) for every preference pair: ``TRAIN_REJECTED`` rejected replies per training
    prompt (more pairs to learn from at no extra cost per step), one per held-out prompt."""
    docs = docstring_answers()
    by_module: dict[str, list[DocAnswer]] = {}
    for item in docs:
        by_module.setdefault(item.module, []).append(item)
    modules = sorted(by_module)
    for item in docs:  # the right docstring vs ones from other modules
        others = [m for m in modules if m != item.module]
        for n in range(1 if held_out(item.name) else TRAIN_REJECTED):  # each from a different module
            salt = _suffix(n)
            module = others[int(_key_hash(item.name + "/other-module" + salt) * len(others))]
            others = [m for m in others if m != module]
            other = by_module[module][int(_key_hash(item.name + "/other" + salt) * len(by_module[module]))]
            yield item.name, {"id": f"doc/{item.name}{salt}", "prompt": _question(item, 1), "chosen": item.answer, "rejected": other.answer}
    for problem in arithmetic_problems():  # the correct result vs wrong ones
        for n, wrong in enumerate(wrong_results(problem, 1 if held_out(problem.key) else TRAIN_REJECTED)):
            yield problem.key, {
                "id": problem.key + _suffix(n), "prompt": problem.question,
                "chosen": problem.solution(), "rejected": problem.solution(wrong),
            }
    yield from demo_safety.preference_rows()  # refuse harm, help with look-alikes


def prompt_examples() -> Iterator[tuple[str, dict[str, Any]]]:
    """(split key, row): arithmetic prompts with their verifiable answers."""
    for problem in arithmetic_problems():
        yield problem.key, {"id": problem.key, "prompt": problem.question, "answer": str(problem.result)}


def feedback_prompts() -> list[dict[str, Any]]:
    """The feedback stage's prompts: its own safety templates' requests (held out of every set here)
    and ordinary training requests, whose revisions touch no evaluation prompt."""
    docs = [d for d in docstring_answers() if not held_out(d.name)]
    problems = [p for p in arithmetic_problems() if not held_out(p.key)]
    return [
        *demo_safety.feedback_rows(),
        *({"id": f"doc/{d.name}", "prompt": _question(d, 2)} for d in _hash_order(docs, lambda d: d.name, "/feedback")[:FEEDBACK_ORDINARY]),
        *({"id": p.key, "prompt": p.question} for p in _hash_order(problems, lambda p: p.key, "/feedback")[:FEEDBACK_ORDINARY]),
    ]


def _write(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)
    return path


SETS = {"sft": sft_examples, "preference": preference_examples, "prompts": prompt_examples}


def write_demo_chat(out_dir: Path) -> dict[str, Path]:
    """Write ``{sft,preference,prompts}_{train,heldout}.jsonl`` and ``feedback_prompts.jsonl`` into
    ``out_dir``; return name -> file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, examples in SETS.items():
        rows = list(examples())
        for side, keep in (("train", False), ("heldout", True)):
            written[f"{name}_{side}"] = _write((row for key, row in rows if held_out(key) == keep), out_dir / f"{name}_{side}.jsonl")
    written["feedback_prompts"] = _write(feedback_prompts(), out_dir / "feedback_prompts.jsonl")
    return written
