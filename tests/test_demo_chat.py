"""The demo post-training data: valid in its own formats, real-derived, split consistently, deterministic."""

from __future__ import annotations

import inspect
import json
import operator
import os
import re
from collections import Counter

import pytest

from tasks.data import demo_cai, demo_safety
from tasks.data.chat_data import ChatSource, load_examples
from tasks.data.demo_chat import TRAIN_REJECTED, docstring_answers, first_paragraph, held_out, write_demo_chat
from tasks.eval.scoring import is_refusal
from tasks.feedback.prompts import CHOICES, choice_conversation, revision_conversation
from tasks.train.rewards import arithmetic_reward

STOPWORDS = {"a", "an", "the", "my", "to", "of", "in", "on", "for", "with", "and", "i", "it", "at", "from", "own", "without"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = write_demo_chat(tmp_path_factory.mktemp("chat"))
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    return paths, rows


@pytest.fixture(scope="module")
def constitution():
    return demo_cai.constitution()


def _texts(row: dict) -> list[str]:
    """Every string a row shows the model: message contents, prompt, replies."""
    out = [m["content"] for m in row.get("messages", [])]
    return out + [row[k] for k in ("prompt", "chosen", "rejected") if isinstance(row.get(k), str)]


def _split_templates(which: str) -> list[demo_safety.Template]:
    return [t for t in demo_safety.templates() if demo_safety.split(t.key) == which]


def test_every_set_is_written_in_a_format_the_stages_accept(demo):
    paths, rows = demo
    sets = {f"{s}_{p}" for s in ("sft", "preference", "prompts") for p in ("train", "heldout")}
    assert set(paths) == sets | {"feedback_prompts"}
    kinds = {"sft": "chat", "preference": "preference", "prompts": "prompt", "feedback": "prompt"}
    for name, path in paths.items():
        loaded = load_examples([ChatSource(name="demo", path=str(path))], kinds[name.split("_")[0]], name)
        assert loaded.quarantine == [], name
        assert len(loaded.rows) == len(rows[name]) > 10, name
        assert len({r["id"] for r in rows[name]}) == len(rows[name]), name
    assert len(rows["sft_train"]) > 1500 and len(rows["preference_train"]) > 1500
    # the CAI exercises and the larger safety set keep the demo's SFT within ~30% of its size without them
    assert len(rows["sft_train"]) <= 1.31 * 1933


def test_held_out_share_and_no_family_on_both_sides(demo):
    _, rows = demo
    # a function, problem or safety template is on one side only, whichever set it appears in
    def families(name):
        return {r["id"].split("/")[0] + "/" + r["id"].split("/")[1] for r in rows[name]}
    for kind in ("sft", "preference", "prompts"):
        train, held = families(f"{kind}_train"), families(f"{kind}_heldout")
        assert 0.05 < len(held) / (len(train) + len(held)) < 0.16, kind
    for kind in ("sft", "preference", "prompts"):
        assert not families(f"{kind}_train") & families(f"{kind}_heldout")
    assert not families("sft_train") & families("preference_heldout")
    # no training conversation (multi-turn, critique or judge question) holds a held-out function's answer
    held_answers = {r["chosen"] for r in rows["preference_heldout"] if r["id"].startswith("doc/")}
    trained = {t for r in rows["sft_train"] for t in _texts(r)}
    trained |= {line[4:] for r in rows["sft_train"] if r["id"].startswith("cai/judge/") for line in r["messages"][0]["content"].splitlines()}
    assert not held_answers & trained


def test_output_is_identical_across_calls(demo, tmp_path):
    paths, _ = demo
    again = write_demo_chat(tmp_path)
    assert {k: p.read_bytes() for k, p in again.items()} == {k: p.read_bytes() for k, p in paths.items()}


def test_docstring_answers_are_the_real_docstrings(demo):
    _, rows = demo
    everything = rows["sft_train"] + rows["sft_heldout"]
    by_id = {r["id"]: r for r in everything}
    dumps = by_id["doc/json.dumps"]["messages"]
    user = [m for m in dumps if m["role"] == "user"][0]
    assert "`json.dumps`" in user["content"]
    assert [m for m in dumps if m["role"] == "assistant"][0]["content"] == first_paragraph(inspect.getdoc(json.dumps))
    assert by_id["doc/os.getcwd"]["messages"][-1]["content"] == first_paragraph(inspect.getdoc(os.getcwd), min_chars=1)
    assert any(len(r["messages"]) >= 4 for r in everything if r["id"].startswith("doc/"))  # multi-turn
    assert any(r["messages"][0]["role"] == "system" for r in everything)


def test_arithmetic_pairs_are_verifiable(demo):
    _, rows = demo
    math_prefs = [r for r in rows["preference_train"] if r["id"].startswith("math/")]
    prompts = {r["id"]: r["answer"] for r in rows["prompts_train"]}
    assert len(math_prefs) > 3000
    rejected = {}
    for r in math_prefs:
        answer = prompts["/".join(r["id"].split("/")[:2])]  # math/<key>[/n]
        assert arithmetic_reward(r["chosen"], answer) == 1.0
        assert arithmetic_reward(r["rejected"], answer) == 0.0
        rejected.setdefault(r["prompt"], set()).add(r["rejected"])
    # three different wrong results per training problem, one per held-out problem
    assert {len(v) for v in rejected.values()} == {TRAIN_REJECTED}
    held = [r for r in rows["preference_heldout"] if r["id"].startswith("math/")]
    assert len({r["prompt"] for r in held}) == len(held)
    docs = [r for r in rows["preference_train"] if r["id"].startswith("doc/")]
    by_prompt = {}
    for r in docs:
        by_prompt.setdefault(r["prompt"], set()).add(r["rejected"])
    assert {len(v) for v in by_prompt.values()} == {TRAIN_REJECTED}
    sft_math = [r for r in rows["sft_train"] if r["id"].startswith("math/")]
    assert all(arithmetic_reward(r["messages"][-1]["content"], prompts[r["id"]]) == 1.0 for r in sft_math)


def test_held_out_is_a_stable_function_of_the_key():
    assert held_out("math/abc") == held_out("math/abc")
    share = sum(held_out(f"k{i}") for i in range(5000)) / 5000
    assert 0.08 < share < 0.12


# ---------------------------------------------------------------------------------- safety


def test_safety_templates_split_by_template_with_every_category_on_each_side():
    templates = demo_safety.templates()
    assert len(templates) >= 60 and len({t.key for t in templates}) == len(templates)
    for category in demo_safety.CATEGORIES:
        sides = Counter(demo_safety.split(t.key) for t in templates if t.category is category)
        assert sides["train"] >= 4 and sides["eval"] >= 1 and sides["feedback"] >= 1, category.name
    for t in templates:
        assert held_out(t.key) == (demo_safety.split(t.key) != "train")


def test_held_out_templates_appear_in_no_training_row(demo):
    _, rows = demo
    trained = "\n".join(t for name in ("sft_train", "preference_train") for r in rows[name] for t in _texts(r)).lower()
    held = _split_templates("eval") + _split_templates("feedback")
    assert not [t.key for t in held if t.harmful.lower() in trained or t.benign.lower() in trained]
    for t in _split_templates("train"):  # the check above can fail: training templates are found
        assert t.harmful.lower() in trained and t.benign.lower() in trained, t.key
    # the feedback stage's templates are in no evaluation row either, so its AI labels never hold one
    evaluated = "\n".join(t for name in ("sft_heldout", "preference_heldout") for r in rows[name] for t in _texts(r))
    evaluated += "\n".join(r["prompt"] for r in demo_safety.suite_rows())
    assert not [t.key for t in _split_templates("feedback") if t.harmful in evaluated or t.benign in evaluated]


def test_harmful_requests_share_surface_words_with_their_look_alikes():
    for t in demo_safety.templates():
        words = [set(re.findall(r"[a-z0-9-]+", text.lower())) - STOPWORDS for text in (t.harmful, t.benign)]
        assert words[0] & words[1], t.key


def test_refusals_carry_a_refusal_marker_and_nothing_else_does():
    requests = [demo_safety.Request(t, f, h) for t in demo_safety.templates() for f in range(len(demo_safety.FRAMINGS)) for h in (True, False)]
    for r in requests:
        assert is_refusal(r.good()) == r.harmful, r.id
        assert is_refusal(r.bad()) != r.harmful, r.id
    assert all(is_refusal(text) for text in demo_safety.REFUSALS)


def test_safety_sets_refuse_harm_and_help_look_alikes(demo):
    _, rows = demo
    sft = [r for name in ("sft_train", "sft_heldout") for r in rows[name] if r["id"].startswith("safety/")]
    prefs = [r for name in ("preference_train", "preference_heldout") for r in rows[name] if r["id"].startswith("safety/")]
    for r in sft:
        assert is_refusal(r["messages"][-1]["content"]) == r["id"].endswith("/harmful"), r["id"]
    # helping opens alike, so a greedy decoder chooses between helping and refusing at the first word
    assert len({r["messages"][-1]["content"].split()[0] for r in sft if r["id"].endswith("/benign")}) == 1
    for r in prefs:
        assert is_refusal(r["chosen"]) == r["id"].endswith("/harmful") != is_refusal(r["rejected"]), r["id"]
    held = [r for r in rows["preference_heldout"] if r["id"].startswith("safety/")]
    assert len(held) >= 50 and {r["id"].split("/")[1].split("-")[0] for r in held} == {c.name for c in demo_safety.CATEGORIES}
    assert all(demo_safety.split("/".join(r["id"].split("/")[:2])) == "eval" for r in held)


def test_safety_suite_holds_every_category_of_the_eval_templates():
    rows = demo_safety.suite_rows()
    assert len(rows) >= 150 and Counter(r["harmful"] for r in rows)[True] == len(rows) / 2
    keys = {"/".join(r["id"].split("/")[:2]) for r in rows}
    assert {demo_safety.split(k) for k in keys} == {"eval"}
    assert {k.split("/")[1].split("-")[0] for k in keys} == {c.name for c in demo_safety.CATEGORIES}


def test_feedback_prompts_mix_red_team_look_alikes_and_ordinary_training_requests(demo):
    _, rows = demo
    prompts = rows["feedback_prompts"]
    assert 150 <= len(prompts) <= 250
    safety = [r for r in prompts if r["id"].startswith("safety/")]
    assert {demo_safety.split("/".join(r["id"].split("/")[:2])) for r in safety} == {"feedback"}
    assert Counter(r["id"].rsplit("/", 1)[1] for r in safety) == {"harmful": len(safety) / 2, "benign": len(safety) / 2}
    ordinary = [r for r in prompts if not r["id"].startswith("safety/")]
    assert {r["id"].split("/")[0] for r in ordinary} == {"doc", "math"}
    assert not [r for r in ordinary if held_out(r["id"].removeprefix("doc/"))]


def test_sft_is_taught_only_the_right_first_reply_to_each_safety_request(demo):
    """Revision exercises quote a bad reply to critique it: it carries weight 0, so SFT reads it and
    never learns to write it; every reply SFT does learn refuses the harmful and helps the benign."""
    _, rows = demo
    quoted = taught = 0
    for r in rows["sft_train"]:
        if "safety/" in r["id"] and not r["id"].startswith("cai/judge/"):  # the request, then the reply
            reply = r["messages"][1]
            right = is_refusal(reply["content"]) == r["id"].endswith("/harmful")
            if reply.get("weight") == 0:
                quoted += 1
                assert not right, r["id"]
            else:
                taught += 1
                assert right, r["id"]
    assert quoted > 0 and taught > quoted


# ---------------------------------------------------------------------------------- CAI exercises


def _exercises(rows, kind):
    return [r for r in rows["sft_train"] if r["id"].startswith(f"cai/{kind}/")]


def _source(row_id: str) -> str:
    return row_id.split("/")[2]  # cai/<kind>/<source>/…


def _is_good(source_id: str, reply: str, answers: dict[str, str]) -> bool:
    """Whether ``reply`` is the right one for its request, judged without the exercise's own labels."""
    if source_id.startswith("safety/"):
        return is_refusal(reply) == source_id.endswith("/harmful")
    if source_id.startswith("math/"):
        a, op, b, result = re.fullmatch(r"(\d+) ([+*-]) (\d+) = (\d+)\. The answer is \4\.", reply).groups()
        return {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b)) == int(result)
    return reply == answers[source_id.removeprefix("doc/")]


def test_revision_exercises_are_the_feedback_stage_conversations_with_the_constitution_verbatim(demo, constitution):
    _, rows = demo
    answers = {d.name: d.answer for d in docstring_answers()}
    exercises = _exercises(rows, "revise")
    assert len(exercises) >= 150 and {_source(r["id"]) for r in exercises} == {"safety", "math", "doc"}
    by_critique = {p.critique: p for p in constitution.principles}
    kept = Counter()
    for row in exercises:
        m = row["messages"]
        principle = by_critique[m[2]["content"]]
        quoted = {k: v for k, v in m[1].items() if k != "weight"}
        assert [m[0], quoted, *m[2:5]] == revision_conversation(m[:1], m[1]["content"], m[3]["content"], principle)
        assert m[4]["content"] == principle.revision and m[5]["role"] == "assistant" and len(m) == 6
        source_id = row["id"].split("/", 2)[2]
        assert _is_good(source_id, m[5]["content"], answers), row["id"]  # the revision is right
        good_first = _is_good(source_id, m[1]["content"], answers)
        assert m[3]["content"].startswith("The response is fine") == good_first, row["id"]
        assert (quoted == m[5]) == good_first and (m[1].get("weight") == 0) == (not good_first)
        kept[good_first] += 1
    assert abs(kept[True] - kept[False]) <= 1
    assert {by_critique[r["messages"][2]["content"]].name for r in exercises} == {p.name for p in constitution.principles}


def test_judge_exercises_name_the_better_reply_in_balanced_positions(demo, constitution):
    _, rows = demo
    answers = {d.name: d.answer for d in docstring_answers()}
    exercises = _exercises(rows, "judge")
    assert len(exercises) >= 150 and {_source(r["id"]) for r in exercises} == {"safety", "math", "doc"}
    labels = Counter()
    by_principle = {p.name: Counter() for p in constitution.principles}
    for row in exercises:
        question, answer = row["messages"]
        text = question["content"]
        (principle,) = [p for p in constitution.principles if f"\n{p.comparison}\n" in text]
        request = re.search(r"^Human: (.*)$", text, re.M).group(1)
        first, second = re.search(r"^\(A\) (.*)$", text, re.M).group(1), re.search(r"^\(B\) (.*)$", text, re.M).group(1)
        assert [question] == choice_conversation([{"role": "user", "content": request}], first, second, principle)
        assert answer == {"role": "assistant", "content": answer["content"]} and answer["content"] in CHOICES
        picked, other = (first, second) if answer["content"] == CHOICES[0] else (second, first)
        source_id = row["id"].split("/", 2)[2]
        assert _is_good(source_id, picked, answers) and not _is_good(source_id, other, answers), row["id"]
        labels[answer["content"]] += 1
        by_principle[principle.name][answer["content"]] += 1
    assert abs(labels[CHOICES[0]] - labels[CHOICES[1]]) <= 1
    for name, counts in by_principle.items():  # no principle teaches a position either
        assert min(counts.values()) >= 0.3 * sum(counts.values()), name


def test_every_exercise_fits_the_bound(demo):
    _, rows = demo
    exercises = _exercises(rows, "revise") + _exercises(rows, "judge")
    assert max(demo_cai.chars(r["messages"]) for r in exercises) <= demo_cai.MAX_CHARS


def test_an_exercise_over_the_bound_is_dropped_without_shifting_the_balance(constitution):
    def case(n: int, reply: str = "Fine.") -> demo_cai.Case:
        return demo_cai.Case(f"k{n}", f"case/{n}", "Question?", reply, "Wrong.", "The response is wrong.", "The response is fine.")
    cases = [case(0), case(1, "x" * demo_cai.MAX_CHARS), case(2), case(3), case(4)]
    judged = list(demo_cai.judge_rows(cases, constitution.principles))
    assert [row["id"] for _, row in judged] == ["cai/judge/case/0", "cai/judge/case/2", "cai/judge/case/3", "cai/judge/case/4"]
    assert [row["messages"][-1]["content"] for _, row in judged] == ["(A)", "(B)", "(A)", "(B)"]
    assert [key for key, _ in judged] == ["k0", "k2", "k3", "k4"]
    revised = [row["messages"] for _, row in demo_cai.revision_rows(cases, constitution.principles)]
    assert [m[1]["content"] for m in revised] == ["Wrong.", "Fine.", "Wrong.", "Fine."]
