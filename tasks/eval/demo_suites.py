"""Demo evaluation suites, one per suite kind, built from what every Python install has.

Each is held out from the demo training data by content, not by chance:

- ``heldout_text.jsonl`` (perplexity): ``code`` = standard-library *test* modules, which the demo
  corpus skips (``demo_corpus._CODE_SKIP``); ``docs`` = docstrings of C-implemented modules
  (they exist in no ``.py`` file, and none is a post-training docstring module); ``web`` = Debian
  package descriptions from the dpkg database, when the machine has one (PyPI pages are the
  corpus's web domain).
- ``stdlib_modules.jsonl`` (multiple choice): "which module defines `X`?" over modules outside
  ``demo_chat.DOC_MODULES``, with three other modules as distractors.
- ``arithmetic.jsonl`` (exact match): word problems from ``demo_chat``'s own held-out split.
- ``code.jsonl`` (pass@k): small HumanEval-style functions from templates that appear in no
  training set, with tests computed from a reference solution (``canonical_solution``).
- ``safety.jsonl``: harmful requests with benign look-alikes from ``demo_safety``'s ``eval``
  templates, whose actions appear in no training set (every framing of both sides).
- ``prompts.jsonl`` (pairwise): ``demo_chat``'s held-out docstring questions and word problems.

Output is deterministic for a given environment (sorted sources, hash-based choices).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.data import demo_chat, demo_safety
from tasks.data.demo_corpus import _CODE_SKIP

TEXTS_PER_DOMAIN = 30
TEXT_CHARS = (400, 4000)
DOC_MODULES_C = (
    "array", "atexit", "binascii", "builtins", "cmath", "errno", "faulthandler", "fcntl", "gc", "grp",
    "marshal", "mmap", "pwd", "resource", "select", "sys", "termios", "unicodedata",
)
CHOICE_MODULES = (
    "argparse", "array", "binascii", "bz2", "cmath", "colorsys", "contextlib", "dataclasses", "datetime",
    "decimal", "enum", "fractions", "getpass", "gettext", "ipaddress", "keyword", "locale", "logging",
    "lzma", "mimetypes", "pickle", "platform", "pprint", "queue", "secrets", "shelve", "socket", "sqlite3",
    "tarfile", "threading", "traceback", "typing", "unicodedata", "warnings", "weakref", "zipfile",
)
NAMES_PER_MODULE = 2
ARITHMETIC_PROMPTS = 50
DOC_PROMPTS, MATH_PROMPTS = 25, 15
# (entry point, argument, docstring, reference body, test arguments); {k} is the task's parameter.
CODE_TEMPLATES: tuple[tuple[str, str, str, str, tuple[Any, ...]], ...] = (
    ("sum_multiples_of_{k}", "xs", "Return the sum of the numbers in `xs` that are divisible by {k}.",
     "return sum(x for x in xs if x % {k} == 0)", ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [], [5, 14, 21, 35])),
    ("repeat_{k}_times", "s", "Return `s` repeated {k} times, separated by single spaces.",
     "return ' '.join([s] * {k})", ("ab", "x", "hello")),
    ("scale_by_{k}", "xs", "Return a new list with every number in `xs` multiplied by {k}.",
     "return [x * {k} for x in xs]", ([1, 2, 3], [], [-4, 0, 10])),
    ("first_{k}_upper", "s", "Return the first {k} characters of `s` in upper case.",
     "return s[:{k}].upper()", ("python", "ab", "crucible rocks")),
    ("is_divisible_by_{k}", "n", "Return True if `n` is divisible by {k}, else False.",
     "return n % {k} == 0", (0, 12, 13, 35, 42, 99)),
    ("clamp_to_{k}", "xs", "Return `xs` with every number greater than {k} replaced by {k}.",
     "return [min(x, {k}) for x in xs]", ([1, 5, 9], [], [3, 4, 7, 8])),
    ("words_longer_than_{k}", "text", "Return the words of `text` (split on whitespace) with more than {k} characters, in order.",
     "return [w for w in text.split() if len(w) > {k}]", ("a quick brown fox jumps", "", "extraordinary words only")),
    ("count_above_{k}", "xs", "Return how many numbers in `xs` are strictly greater than {k}.",
     "return sum(1 for x in xs if x > {k})", ([1, 3, 5, 7, 9], [], [10, 2, 8])),
)
CODE_PARAMETERS = (3, 4, 7)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at the last line break before it."""
    return text if len(text) <= limit else text[: text.rfind("\n", 0, limit) + 1 or limit]


# ---------------------------------------------------------------------------------- perplexity


def _test_modules() -> Iterator[dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in (root / "test").rglob("*.py") if "site-packages" not in p.parts]
    for path in sorted(paths, key=lambda p: _hash(p.relative_to(root).as_posix())):
        assert _CODE_SKIP & set(path.relative_to(root).parts), "a held-out code file must be one the corpus skips"
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= TEXT_CHARS[0]:
            yield {"id": f"code/{path.relative_to(root).as_posix()}", "domain": "code", "text": _cut(text, TEXT_CHARS[1])}


def _c_module_docs() -> Iterator[dict[str, Any]]:
    for name in DOC_MODULES_C:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. fcntl off Linux
            continue
        parts = [inspect.cleandoc(module.__doc__ or "")]
        for attr, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None) if inspect.isbuiltin(obj) else None
            if not attr.startswith("_") and doc:
                parts.append(f"{attr}\n{inspect.cleandoc(doc)}")
        text = "\n\n".join(p for p in parts if p)
        if len(text) >= TEXT_CHARS[0]:
            yield {"id": f"docs/{name}", "domain": "docs", "text": _cut(text, TEXT_CHARS[1])}


def _debian_descriptions(status: Path = Path("/var/lib/dpkg/status")) -> Iterator[dict[str, Any]]:
    if not status.is_file():
        return
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        lines = stanza.split("\nDescription: ", 1)
        if "Package" not in fields or len(lines) < 2:
            continue
        description = []
        for i, line in enumerate(lines[1].splitlines()):
            if i and not line.startswith(" "):
                break
            description.append("" if line.strip() == "." else line.strip())
        text = f"{fields['Package']}: " + "\n".join(description)
        if len(text) >= TEXT_CHARS[0]:
            yield {"id": f"web/{fields['Package']}", "domain": "web", "text": _cut(text, TEXT_CHARS[1])}


def heldout_texts() -> list[dict[str, Any]]:
    rows = []
    for source in (_test_modules, _c_module_docs, _debian_descriptions):
        chosen = sorted(source(), key=lambda r: _hash(r["id"]))[:TEXTS_PER_DOMAIN]
        rows.extend(sorted(chosen, key=lambda r: r["id"]))
    return rows


# ---------------------------------------------------------------------------------- multiple choice


def module_questions() -> list[dict[str, Any]]:
    assert not set(CHOICE_MODULES) & set(demo_chat.DOC_MODULES), "quiz modules must be held out of SFT"
    defined: dict[str, list[str]] = {}
    for name in CHOICE_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if not attr.startswith("_") and callable(obj) and getattr(obj, "__module__", None) in (name, f"_{name}"):
                defined.setdefault(attr, []).append(name)
    unique = sorted((mods[0], attr) for attr, mods in defined.items() if len(mods) == 1)
    rows = []
    for module in CHOICE_MODULES:
        names = sorted((a for m, a in unique if m == module), key=lambda a: _hash(f"{module}.{a}"))[:NAMES_PER_MODULE]
        for attr in names:
            key = f"{module}.{attr}"
            others = sorted((m for m in CHOICE_MODULES if m != module), key=lambda m: _hash(f"{key}/{m}"))[:3]
            answer = _hash(key + "/answer") % 4
            choices = others[:answer] + [module] + others[answer:]
            question = f"Question: Which Python standard-library module defines `{attr}`?\nAnswer:"
            rows.append({"id": key, "question": question, "choices": choices, "answer": answer})
    return rows


# ---------------------------------------------------------------------------------- generation


def arithmetic_rows() -> list[dict[str, Any]]:
    held = [p for p in demo_chat.arithmetic_problems() if demo_chat.held_out(p.key)]
    return [{"id": p.key, "prompt": p.question, "answer": str(p.result)} for p in held[:ARITHMETIC_PROMPTS]]


def code_tasks() -> list[dict[str, Any]]:
    rows = []
    for template_index, (entry, arg, doc, body, cases) in enumerate(CODE_TEMPLATES):
        for k in CODE_PARAMETERS:
            name = entry.format(k=k)
            prompt = f"def {name}({arg}):\n    \"\"\"{doc.format(k=k)}\"\"\"\n"
            solution = f"    {body.format(k=k)}\n"
            namespace: dict[str, Any] = {}
            exec(prompt + solution, namespace)  # the reference computes the expected results
            asserts = "".join(f"    assert candidate({case!r}) == {namespace[name](case)!r}\n" for case in cases)
            rows.append({
                "task_id": f"Crucible/{template_index}/{k}", "prompt": prompt, "canonical_solution": solution,
                "test": f"def check(candidate):\n{asserts}", "entry_point": name,
            })
    return rows


def pairwise_prompts() -> list[dict[str, Any]]:
    docs = [d for d in demo_chat.docstring_answers() if demo_chat.held_out(d.name)][:DOC_PROMPTS]
    rows = [{"id": f"doc/{d.name}", "prompt": f"What does `{d.name}` do?"} for d in docs]
    rows += [{"id": r["id"], "prompt": r["prompt"]} for r in arithmetic_rows()[:MATH_PROMPTS]]
    return rows


SUITES = {
    "perplexity": ("heldout_text.jsonl", heldout_texts),
    "multiple_choice": ("stdlib_modules.jsonl", module_questions),
    "exact_match": ("arithmetic.jsonl", arithmetic_rows),
    "code": ("code.jsonl", code_tasks),
    "safety": ("safety.jsonl", demo_safety.suite_rows),
    "pairwise": ("prompts.jsonl", pairwise_prompts),
}


def write_demo_suites(out_dir: Path) -> dict[str, Path]:
    """Write one JSONL file per suite kind into ``out_dir``; return kind -> file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, (filename, build) in SUITES.items():
        path = out_dir / filename
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in build()), encoding="utf-8")
        tmp.replace(path)
        written[kind] = path
    return written
