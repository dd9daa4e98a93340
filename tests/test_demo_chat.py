"""The demo post-training data: valid in its own formats, real-derived, split consistently, deterministic."""

from __future__ import annotations

import inspect
import json
import os

import pytest

from tasks.data.chat_data import ChatSource, load_examples
from tasks.data.demo_chat import REFUSAL_PAIRS, REFUSALS, TRAIN_REJECTED, first_paragraph, held_out, write_demo_chat
from tasks.train.rewards import arithmetic_reward


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = write_demo_chat(tmp_path_factory.mktemp("chat"))
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    return paths, rows


def test_every_set_is_written_in_a_format_the_stages_accept(demo):
    paths, rows = demo
    assert set(paths) == {f"{s}_{p}" for s in ("sft", "preference", "prompts") for p in ("train", "heldout")}
    kinds = {"sft": "chat", "preference": "preference", "prompts": "prompt"}
    for name, path in paths.items():
        loaded = load_examples([ChatSource(name="demo", path=str(path))], kinds[name.rsplit("_", 1)[0]], name)
        assert loaded.quarantine == [], name
        assert len(loaded.rows) == len(rows[name]) > 10, name
    assert len(rows["sft_train"]) > 1500 and len(rows["preference_train"]) > 1500


def test_held_out_share_and_no_family_on_both_sides(demo):
    _, rows = demo
    # a function or problem is on one side only, whichever set it appears in
    def families(name):
        return {r["id"].split("/")[0] + "/" + r["id"].split("/")[1] for r in rows[name]}
    for kind in ("sft", "preference", "prompts"):
        train, held = families(f"{kind}_train"), families(f"{kind}_heldout")
        assert 0.05 < len(held) / (len(train) + len(held)) < 0.16, kind
    for kind in ("sft", "preference", "prompts"):
        assert not families(f"{kind}_train") & families(f"{kind}_heldout")
    assert not families("sft_train") & families("preference_heldout")
    # a multi-turn conversation never brings a held-out function's answer into training
    held_answers = {r["chosen"] for r in rows["preference_heldout"] if r["id"].startswith("doc/")}
    for r in rows["sft_train"]:
        assert not held_answers & {m["content"] for m in r["messages"] if m["role"] == "assistant"}


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
    assert any(len(r["messages"]) >= 4 for r in everything)  # multi-turn
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


def test_refusals_sit_next_to_helpful_look_alikes(demo):
    _, rows = demo
    sft = rows["sft_train"] + rows["sft_heldout"]
    harmful = [r for r in sft if "/harmful/" in r["id"]]
    benign = [r for r in sft if "/benign/" in r["id"]]
    assert len(harmful) == len(benign) == 3 * len(REFUSAL_PAIRS)
    assert all(r["messages"][-1]["content"] in REFUSALS for r in harmful)
    assert all(r["messages"][-1]["content"].startswith("Use `") for r in benign)
    prefs = rows["preference_train"] + rows["preference_heldout"]
    for r in prefs:
        if r["id"].endswith("/harmful"):
            assert r["chosen"] in REFUSALS and r["rejected"] not in REFUSALS
        if r["id"].endswith("/benign"):
            assert r["rejected"] in REFUSALS and r["chosen"].startswith("Use `")


def test_held_out_is_a_stable_function_of_the_key():
    assert held_out("math/abc") == held_out("math/abc")
    share = sum(held_out(f"k{i}") for i in range(5000)) / 5000
    assert 0.08 < share < 0.12
