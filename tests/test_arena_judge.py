"""The arena's judge: human votes when there are enough on the current replies, else the configured
judge, else the reward stage's model (flagged when align optimises it); human Elo with intervals;
a principle judge on a tiny model that prefers the polite replies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tasks.config import PipelineConfig
from tasks.errors import ConfigError, StageError
from tasks.eval import evaluate
from tasks.eval.arena import choose_judge, human_elo, human_verdicts, optimised_reward, tally
from tasks.eval.evaluate import EvaluateConfig, inputs_digest
from tasks.eval.pairwise import JudgeRun, PairwiseSuite, PrincipleJudgeConfig, RewardModelJudge, arena_metrics
from tasks.eval.report import arena_section, human_elo_table
from tasks.eval.suite import SuiteOutput
from tasks.feedback.votes import RatedPair, VoteStore
from tasks.stage import StageContext
from tasks.store import StageDir
from tasks.tracking import RunLogger
from tasks.train.align import AlignConfig

PROMPTS = ["Tell me about the river.", "What does the baker sell?", "Add two numbers.", "Name a boat."]


def _replies(models=("pretrain", "sft", "align"), **changed: str) -> dict[str, list[dict]]:
    """The models' replies to PROMPTS; ``changed`` replaces one model's first reply (a retrained model)."""
    replies = {model: [{"id": str(i), "prompt": p, "reply": f"{model} answers {i}"} for i, p in enumerate(PROMPTS)] for model in models}
    for model, reply in changed.items():
        replies[model][0]["reply"] = reply
    return replies


def _pair(replies: dict[str, list[dict]], a: str, b: str, i: int, suite: str = "duel") -> RatedPair:
    first, second = replies[a][i], replies[b][i]
    return RatedPair(suite, first["id"], first["prompt"], a, first["reply"], b, second["reply"])


def _vote(store: VoteStore, rater: str, pair: RatedPair, winner: str) -> None:
    store.add_rater(rater)  # again for a known rater: a new token, the same votes
    assert store.record(rater, pair, winner)


def _suite(**fields) -> PairwiseSuite:
    return PairwiseSuite(name="duel", path="unused.jsonl", **fields)


def test_votes_then_configured_judge_then_reward_model_with_a_warning(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    replies = _replies()
    for i, rater in enumerate(("ann", "bob", "ann")):
        _vote(store, rater, _pair(replies, "align", "sft", i), "a")
    votes = tally(store.votes("duel"), replies)
    principle = PrincipleJudgeConfig(path="/judge", constitution="c.yaml", principles=["polite"])

    human = choose_judge(_suite(min_human_votes=3), principle, "/store/reward/model", votes, rl_reward=True)
    assert human.model is None and human.warning is None
    assert human.description == "human votes: 3 votes by 2 raters"

    # too few votes: the suite's own judge, then evaluate's, then the reward stage's model
    own = RewardModelJudge(path="/other-reward")
    assert choose_judge(_suite(min_human_votes=4, judge=own), principle, "/store/reward/model", votes, rl_reward=True).model == own
    configured = choose_judge(_suite(min_human_votes=4), principle, "/store/reward/model", votes, rl_reward=True)
    assert configured.model == principle and configured.warning is None
    fallback = choose_judge(_suite(min_human_votes=4), None, "/store/reward/model", votes, rl_reward=True)
    assert fallback.model == RewardModelJudge(path="/store/reward/model")
    assert fallback.description == "the reward stage's model `/store/reward/model`"
    assert "reward model that `align` optimises" in fallback.warning and "rates itself up" in fallback.warning
    assert choose_judge(_suite(min_human_votes=4), None, "/store/reward/model", votes, rl_reward=False).warning is None
    with pytest.raises(StageError, match="no judge"):
        choose_judge(_suite(min_human_votes=4), None, None, votes, rl_reward=False)

    def pipeline(**align) -> PipelineConfig:
        return PipelineConfig.model_construct(name="p", align=AlignConfig.model_construct(**align) if align else None)

    assert optimised_reward(pipeline(method="ppo", reward="model")) and optimised_reward(pipeline(method="grpo", reward="model"))
    assert not optimised_reward(pipeline(method="grpo", reward="arithmetic"))
    assert not optimised_reward(pipeline(method="dpo", reward="model")) and not optimised_reward(pipeline())

    section = arena_section("duel", fallback, 12, votes, None, 4)
    assert "Judge: the reward stage's model `/store/reward/model` (12 games)." in section
    assert "> **Warning:** this arena is judged by the reward model that `align` optimises" in section


def test_votes_on_replies_that_changed_are_stale_and_not_counted(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    before = _replies()
    _vote(store, "ann", _pair(before, "align", "sft", 0), "a")  # sft's first reply changes below
    _vote(store, "ann", _pair(before, "align", "pretrain", 0), "b")  # still current
    _vote(store, "bob", _pair(before, "align", "pretrain", 1), "tie")  # still current
    _vote(store, "bob", replace(_pair(before, "align", "sft", 2), prompt="An older prompt."), "a")  # the suite's row was edited
    _vote(store, "bob", _pair({**before, "base": before["sft"]}, "align", "base", 3), "a")  # a model not evaluated now

    now = _replies(sft="sft answers differently")
    votes = tally(store.votes("duel"), now)
    assert len(votes.current) == 2 and len(votes.stale) == 3
    assert {(v.pair.model_b, v.pair.prompt_id) for v in votes.current} == {("pretrain", "0"), ("pretrain", "1")}
    assert choose_judge(_suite(min_human_votes=3), None, "/reward", votes, rl_reward=False).model is not None  # 2 < 3

    verdicts = human_verdicts(votes, now)
    assert [(r["a"], r["b"], r["score_a"], r["rater"]) for r in verdicts.records] == [("align", "pretrain", 0.0, "ann"), ("align", "pretrain", 0.5, "bob")]
    section = arena_section("duel", choose_judge(_suite(min_human_votes=3), None, "/reward", votes, False), 12, votes,
                            human_elo(_suite(bootstrap_rounds=50), votes, seed=0), 3)
    assert "3 stale votes (on replies that have changed since) are not counted." in section
    assert "Human Elo (2 votes by 2 raters; 3 make them this arena's judge)" in section


def test_human_elo_intervals_and_win_rates_per_pair(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    replies = _replies()
    # sft beats pretrain 14 times in 16 (one loss, one tie); align and sft split 8 games evenly
    outcomes = {("pretrain", "sft"): ["b"] * 14 + ["a", "tie"], ("align", "sft"): ["a", "b"] * 4}
    for (a, b), winners in outcomes.items():
        for n, winner in enumerate(winners):
            _vote(store, f"rater{n}", _pair(replies, a, b, n % len(PROMPTS)), winner)
    votes = tally(store.votes("duel"), replies)
    assert len(votes.current) == 24 and not votes.stale

    human = human_elo(_suite(bootstrap_rounds=300), votes, seed=0)
    (sft, sft_low, sft_high), (pre, pre_low, pre_high) = human.ratings["sft"], human.ratings["pretrain"]
    for rating, low, high in human.ratings.values():
        assert low < rating < high  # a real spread around the point estimate, never a degenerate one
    assert pre_high < sft_low  # 14 wins in 16: the intervals do not overlap
    assert human.metrics()["sft"] == {"human_elo": sft, "human_elo_low": sft_low, "human_elo_high": sft_high}
    assert human_elo(_suite(), tally([], replies), seed=0) is None

    table = human_elo_table(human).splitlines()
    assert table[0] == "| model | human Elo | 95% interval | games | vs sft | vs align | vs pretrain |"
    assert table[2] == f"| sft | {sft:.1f} | {sft_low:.1f} – {sft_high:.1f} | 24 | – | 0.50 of 8 | 0.91 of 16 |"
    assert table[4] == f"| pretrain | {pre:.1f} | {pre_low:.1f} – {pre_high:.1f} | 16 | 0.09 of 16 | – | – |"


def _constitution(path: Path, comparison: str = "Which response is more polite?") -> str:
    principle = {"name": "polite", "critique": "Say how the response is rude.", "revision": "Rewrite it politely.", "comparison": comparison}
    path.write_text(json.dumps({"principles": [principle]}))  # JSON is YAML
    return str(path)


def _model_folder(path: Path) -> str:
    """A folder that passes as a Hugging Face model at plan time (the human votes never load it)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return str(path)


def test_enough_votes_judge_the_arena_and_new_votes_rerun_evaluate(tmp_path, tmp_home):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    models = ("base-a", "base-b")
    duel = {"name": "duel", "kind": "pairwise", "path": str(prompts), "min_human_votes": 4, "bootstrap_rounds": 50}
    cfg = EvaluateConfig.model_validate({
        "suites": [duel], "judge": _model_folder(tmp_path / "reward"),
        "baselines": [{"name": name, "path": _model_folder(tmp_path / name)} for name in models],
    })
    pipeline = PipelineConfig.model_construct(name="arena-test", evaluate=cfg)
    store = VoteStore.for_pipeline("arena-test")
    replies = _replies(models)

    before = inputs_digest(cfg, pipeline)
    for i in range(4):
        _vote(store, ("ann", "bob")[i % 2], _pair(replies, *models, i), "a" if i < 3 else "tie")
    _vote(store, "ann", _pair(_replies(models, **{"base-b": "an older reply"}), *models, 0), "b")  # stale
    assert inputs_digest(cfg, pipeline) != before  # new votes rerun evaluate

    principle = {"kind": "principle", "path": _model_folder(tmp_path / "judge"), "constitution": _constitution(tmp_path / "c.yaml")}
    judged = EvaluateConfig.model_validate({**cfg.model_dump(), "suites": [{**duel, "judge": principle}]})
    digest = inputs_digest(judged, pipeline)
    _constitution(tmp_path / "c.yaml", "Which response is kinder?")
    assert inputs_digest(judged, pipeline) != digest  # the constitution's text is an input
    unknown = EvaluateConfig.model_validate({**cfg.model_dump(), "suites": [{**duel, "judge": {**principle, "principles": ["brief"]}}]})
    with pytest.raises(ConfigError, match=r"principles.*not in .*c\.yaml: brief"):
        inputs_digest(unknown, pipeline)

    out = StageDir.at(str(tmp_path / "store"), "evaluate", "fp")
    out.make()
    ctx = StageContext(name="evaluate", config=cfg, pipeline=pipeline, upstream={}, out=out, log=RunLogger(None, None))
    outputs = {model: {"duel": SuiteOutput({}, samples)} for model, samples in replies.items()}
    scores: dict[str, dict[str, float]] = {model: {} for model in models}
    [section] = evaluate._arenas(ctx, {}, outputs, scores)

    assert "Judge: human votes: 4 votes by 2 raters (4 games)." in section  # not the configured reward model
    assert "1 stale votes" in section and "| base-a |" in section
    assert scores["base-a"]["duel/win_rate"] == pytest.approx(3.5 / 4) and scores["base-b"]["duel/win_rate"] == pytest.approx(0.5 / 4)
    assert scores["base-a"]["duel/elo"] > scores["base-b"]["duel/elo"]
    for model in models:
        low, rating, high = (scores[model][f"duel/human_elo{end}"] for end in ("_low", "", "_high"))
        assert low <= rating <= high
    assert "duel/reward" not in scores["base-a"]
    games = [json.loads(line) for line in Path(out.path("pairwise/duel.jsonl")).read_text().splitlines()]
    assert [(g["id"], g["rater"], g["winner"]) for g in games] == [("0", "ann", "a"), ("1", "bob", "a"), ("2", "ann", "a"), ("3", "bob", "tie")]


# ---------------------------------------------------------------------------------- principle judge

POLITE = ["Please take a look, thank you for asking.", "With pleasure, thank you kindly.", "Gladly, please ask again."]
RUDE = ["No. Go away.", "Figure it out yourself, idiot.", "Stop bothering me."]
TRAIN_PROMPTS = ["Where is the station?", "Can you help me cook?", "How tall is the tower?"]


def test_principle_judge_ranks_the_model_that_follows_the_principle_first(tmp_path):
    """A tiny judge taught, on other prompts, to answer (A)/(B) for the polite reply ranks the polite model first."""
    from models.presets import build_model
    from models.tokenizer import save_tokenizer, train_tokenizer
    from tasks.eval.lm import LanguageModel, ModelSpec
    from tasks.feedback.constitution import load_constitution
    from tasks.feedback.prompts import CHOICES, choice_conversation

    constitution = _constitution(tmp_path / "c.yaml")
    [principle] = load_constitution(constitution).principles
    lessons = [
        (choice_conversation([{"role": "user", "content": prompt}], first, second, principle), CHOICES[label])
        for prompt in TRAIN_PROMPTS for polite in POLITE for rude in RUDE
        for first, second, label in ((polite, rude, 0), (rude, polite, 1))
    ]
    tokenizer = train_tokenizer([q[0]["content"] for q, _ in lessons] * 4 + list(CHOICES) * 20, vocab_size=512)
    folder = tmp_path / "judge"
    torch.manual_seed(0)
    build_model("tiny", len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    lm = LanguageModel(ModelSpec("judge", str(folder), chat=True), device="cpu")
    rows = [lm.reply_ids(question, label, chat=True) for question, label in lessons]
    width = max(len(head) + len(tail) for head, tail in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (head, tail) in enumerate(rows):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        labels[i, len(head) : len(head) + len(tail)] = torch.tensor(tail)
    lm.model.train()
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=5e-3)
    for _ in range(200):  # 65 to 110 steps (seeds 0-2): the label token's loss goes from ln 2 (a coin flip) to near 0
        loss = lm.model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
        if loss.item() < 0.02:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.model.save_pretrained(folder)

    judge = PrincipleJudgeConfig(path=str(folder), constitution=constitution, principles=["polite"])
    run = JudgeRun(device="cpu", batch_size=8)
    suite = _suite(judge=judge)

    def replies(polite_name: str, rude_name: str) -> dict[str, list[dict]]:
        return {name: [{"id": str(i), "prompt": p, "reply": texts[i % 3]} for i, p in enumerate(PROMPTS)]
                for name, texts in ((polite_name, POLITE), (rude_name, RUDE))}

    first = judge.verdicts(suite, replies("kind", "curt"), run)  # "curt" sorts first: it is each game's model a
    assert [r["a"] for r in first.records] == ["curt"] * len(PROMPTS) and all(r["p_a"] < 0.5 for r in first.records)
    ratings = arena_metrics(first.games(), k=16.0, seed=0)
    assert ratings["kind"]["elo"] > ratings["curt"]["elo"] and ratings["kind"]["win_rate"] == 1.0

    swapped = judge.verdicts(suite, replies("a-kind", "b-curt"), run)  # now the polite model is a
    assert [r["p_a"] for r in swapped.records] == pytest.approx([1.0 - r["p_a"] for r in first.records], abs=1e-6)
    assert [r["score_a"] for r in swapped.records] == [1.0] * len(PROMPTS)
