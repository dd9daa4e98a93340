"""Post-training: data validation, SFT masks and packing, the objectives on a tiny model, and the
``sft`` → ``reward`` → ``align`` stages on Ray Train (a tiny model, a few steps each)."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from models.chat import END
from models.heads import PolicyWithValueHead, RewardModelWithLMHead, sequence_rewards
from models.presets import build_model
from models.tokenizer import save_tokenizer
from tasks.data.chat_data import ChatSource, load_examples
from tasks.errors import ConfigError
from tasks.tracking import experiment_id
from tasks.train import align, reward, sft
from tasks.train.dpo import DPO, response_logprobs
from tasks.train.grpo import GRPO
from tasks.train.loop import FAULT_ENV
from tasks.train.post_data import (
    IGNORE,
    ChatExamples,
    PairExamples,
    PromptExamples,
    encode_conversation,
    encode_pair,
    encode_prompt,
    encode_prompt_row,
    pack,
    write_examples,
)
from tasks.train.post_objectives import token_logprobs
from tasks.train.ppo import PPO, policy_and_values
from tasks.train.reward_objective import PairwiseReward
from tasks.train.rewards import arithmetic_reward, final_answer
from tasks.train.rollout import Sampling, Scorer, causal_logits, generate, generation_metrics

LOCAL = pafs.LocalFileSystem()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does `math.sqrt` do?"},
    {"role": "assistant", "content": "Return the square root of x."},
    {"role": "user", "content": "And `math.floor`?"},
    {"role": "assistant", "content": "Return the floor of x as an Integral."},
]


# ---------------------------------------------------------------------------------- data formats


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_chat_rows_are_validated_and_bad_ones_quarantined_with_file_and_line(tmp_path):
    good = {"id": "a", "messages": CONVERSATION}
    path = _jsonl(tmp_path / "chat.jsonl", [
        good,
        "{not json",
        {"text": "no messages"},
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"id": "a", "messages": CONVERSATION},
        {"id": "b", "messages": CONVERSATION[1:3]},
    ])
    loaded = load_examples([ChatSource(name="s", path=str(path))], "chat", "sft.data")
    assert [e.id for e in loaded.rows] == ["s/a", "s/b"]
    assert loaded.rows[0].value == CONVERSATION
    errors = {q["line"]: q["error"] for q in loaded.quarantine}
    assert all(q["file"] == "chat.jsonl" for q in loaded.quarantine)
    assert "malformed JSON" in errors[2]
    assert errors[3] == "missing field 'messages'"
    assert "messages[0].role is 'bot'" in errors[4]
    assert errors[5] == "messages[0].content is empty"
    assert "only the first message may be one" in errors[6]
    assert "expected 'assistant' (turns must alternate)" in errors[7]
    assert errors[8] == "'messages' must end with a turn by the assistant"
    assert errors[9] == "repeated id 's/a'"


def test_preference_and_prompt_rows_accept_strings_or_messages(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
        {"prompt": "two", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": "c"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x", "rejected": "y"},
        {"prompt": "m", "chosen": "x", "rejected": "y", "margin": "big"},
    ]
    prefs = load_examples([ChatSource(name="p", path=str(_jsonl(tmp_path / "p.jsonl", rows)))], "preference", "align.data")
    assert [e.line for e in prefs.rows] == [1, 2]
    first = prefs.rows[0].value
    assert first.prompt == [{"role": "user", "content": "2+2?"}] and first.chosen == [{"role": "assistant", "content": "4"}]
    assert first.margin == 1.5 and prefs.rows[1].value.margin == 0.0
    errors = {q["line"]: q["error"] for q in prefs.quarantine}
    assert errors == {
        3: "'chosen' and 'rejected' are identical",
        4: "'chosen' must be a string or a list of exactly one assistant message",
        5: "'prompt' must end with a turn by the user",
        6: "'margin' must be a number, got 'big'",
    }
    table = pa.Table.from_pylist([{"prompt": "1+1?", "answer": 2}, {"prompt": " ", "answer": None}])
    pq.write_table(table, tmp_path / "prompts.parquet")
    prompts = load_examples([ChatSource(name="q", path=str(tmp_path / "prompts.parquet"), format="parquet")], "prompt", "align.data")
    assert prompts.rows[0].value.answer == "2" and prompts.rows[0].id == "q/prompts.parquet:1"
    assert prompts.quarantine[0]["line"] == 2 and prompts.quarantine[0]["error"] == "'prompt' is empty"


def test_a_source_matching_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"sft.data\[0\].path.*no files match"):
        load_examples([ChatSource(name="x", path=str(tmp_path / "none*.jsonl"))], "chat", "sft.data")


def test_align_settings_must_match_the_method():
    data = [{"name": "d", "path": "x.jsonl"}]
    with pytest.raises(ValueError, match="settings for grpo given, but method is dpo"):
        align.AlignConfig(method="dpo", data=data, grpo={"group_size": 8})
    with pytest.raises(ValueError, match="reward, sampling apply to grpo and ppo, not dpo"):
        align.AlignConfig(method="dpo", data=data, reward="arithmetic", sampling={"max_new_tokens": 8})
    with pytest.raises(ValueError, match="unknown reward 'regex'"):
        align.AlignConfig(method="grpo", data=data, reward="regex")
    assert align.AlignConfig(method="ppo", data=data, ppo={"epochs": 2}).ppo.epochs == 2


def test_arithmetic_checker_reads_the_final_answer():
    assert final_answer("3 + 4 = 7. The answer is 7.") == "7"
    assert final_answer("it is 1,200") == "1200"
    assert arithmetic_reward("5 + 2 = 7. The answer is 7.", "7") == 1.0
    assert arithmetic_reward("5 + 2 = 7. The answer is 8.", "7") == 0.0
    assert arithmetic_reward("no idea", "7") == 0.0 and arithmetic_reward("7", None) == 0.0


# ---------------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def demo_data(demo_chat_cut):
    """The demo chat data, cut down: 160 training and 16 held-out rows per set."""
    return demo_chat_cut(160)


@pytest.fixture(scope="module")
def tokenizer(demo_data, train_chat_tokenizer):
    return train_chat_tokenizer(demo_data, 600)


@pytest.fixture(scope="module")
def init_model(tokenizer, tmp_path_factory):
    """A freshly initialised tiny model with the tokenizer: the stand-in for ``pretrain``'s output."""
    folder = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    build_model("tiny", len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def test_sft_labels_cover_exactly_the_assistant_tokens_of_every_turn(tokenizer, tmp_path):
    row = encode_conversation(tokenizer, CONVERSATION, 512)
    write_examples([row], LOCAL, str(tmp_path / "x.parquet"))
    batch = ChatExamples(LOCAL, str(tmp_path / "x.parquet"), tokenizer.pad_token_id, packed=False).collate([0])
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE].tolist()
    expected = tokenizer.encode("Return the square root of x." + END, add_special_tokens=False) + tokenizer.encode(
        "Return the floor of x as an Integral." + END, add_special_tokens=False
    )
    assert kept == expected
    assert tokenizer.decode(kept) == "Return the square root of x.<|end|>Return the floor of x as an Integral.<|end|>"
    # every other token (system, user turns, role headers, newlines) is masked
    assert (labels == IGNORE).sum().item() == len(row["input_ids"]) - len(expected)
    assert batch["attention_mask"].all()


def test_packing_restarts_positions_and_keeps_conversations_apart(tokenizer, tmp_path):
    rows = [encode_conversation(tokenizer, c, 512) for c in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:])]
    packed = pack(rows, max_length=len(rows[0]["input_ids"]) + len(rows[1]["input_ids"]))
    assert [p["segments"] for p in packed] == [[len(rows[0]["input_ids"]), len(rows[1]["input_ids"])], [len(rows[2]["input_ids"])]]
    write_examples(packed, LOCAL, str(tmp_path / "p.parquet"))
    batch = ChatExamples(LOCAL, str(tmp_path / "p.parquet"), tokenizer.pad_token_id, packed=True).collate([0, 1])
    first = len(rows[0]["input_ids"])
    assert batch["position_ids"][0, first].item() == 0 and "attention_mask" not in batch
    assert batch["position_ids"][1, len(rows[2]["input_ids"])].item() == 0  # padding is a segment of its own
    torch.manual_seed(0)
    model = build_model("tiny", len(tokenizer)).eval()
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]]), use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    second = slice(first, first + len(rows[1]["input_ids"]))
    assert torch.allclose(together[0, second], alone[0], atol=1e-5)
    assert not torch.allclose(leaky[0, second], alone[0], atol=1e-3)  # without the resets it would attend back
    assert (batch["labels"][0, first] == IGNORE).item()  # a conversation's first token is never a target


def test_preference_rows_mask_only_the_reply(tokenizer, tmp_path):
    from tasks.data.chat_data import PreferencePair

    pair = PreferencePair([{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}],
                          [{"role": "assistant", "content": "five"}], margin=0.5)
    row = encode_pair(tokenizer, pair, 128)
    write_examples([row], LOCAL, str(tmp_path / "p.parquet"))
    batch = PairExamples(LOCAL, str(tmp_path / "p.parquet"), tokenizer.pad_token_id).collate([0])
    assert batch["input_ids"].shape[0] == 2 and batch["margin"].tolist() == [0.5]
    replies = [tokenizer.decode(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["response_mask"])]
    assert replies == ["4<|end|>", "five<|end|>"]


# ---------------------------------------------------------------------------------- objectives


def _prompt_batch(tokenizer, tmp_path, prompts: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    from tasks.data.chat_data import PromptRow

    rows = [encode_prompt_row(tokenizer, PromptRow([{"role": "user", "content": q}], a), 128) for q, a in prompts]
    write_examples(rows, LOCAL, str(tmp_path / "prompts.parquet"))
    return PromptExamples(LOCAL, str(tmp_path / "prompts.parquet"), tokenizer.pad_token_id).collate(range(len(rows)))


def test_dpo_starts_at_log2_and_one_step_widens_the_margin(tokenizer, init_model, tmp_path):
    from tasks.data.chat_data import PreferencePair

    pairs = [PreferencePair([{"role": "user", "content": f"{a}+{a}?"}], [{"role": "assistant", "content": str(2 * a)}],
                            [{"role": "assistant", "content": str(2 * a + 1)}]) for a in range(4)]
    write_examples([encode_pair(tokenizer, p, 128) for p in pairs], LOCAL, str(tmp_path / "d.parquet"))
    batch = PairExamples(LOCAL, str(tmp_path / "d.parquet"), tokenizer.pad_token_id).collate(range(4))
    objective = DPO(str(init_model), beta=0.5)
    objective.prepare(torch.device("cpu"))
    policy = AutoModelForCausalLM.from_pretrained(init_model)
    out = objective.compute(policy, batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert out.metrics["rewards/margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["rewards/accuracy"].item() == pytest.approx(0.5)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    out.loss.backward()
    optimizer.step()
    after = objective.compute(policy, batch)
    assert after.loss.item() < math.log(2)
    assert after.metrics["rewards/margin"].item() > 0


def test_dpo_with_an_nll_weight_adds_the_chosen_replies_nll(tokenizer, init_model, tmp_path):
    from tasks.data.chat_data import PreferencePair

    pairs = [PreferencePair([{"role": "user", "content": f"{a}*{a}?"}], [{"role": "assistant", "content": f"It is {a * a}."}],
                            [{"role": "assistant", "content": str(a)}]) for a in range(3)]
    write_examples([encode_pair(tokenizer, p, 128) for p in pairs], LOCAL, str(tmp_path / "d.parquet"))
    batch = PairExamples(LOCAL, str(tmp_path / "d.parquet"), tokenizer.pad_token_id).collate(range(3))
    objective = DPO(str(init_model), beta=0.5, nll_weight=0.5)
    objective.prepare(torch.device("cpu"))
    policy = AutoModelForCausalLM.from_pretrained(init_model)
    out = objective.compute(policy, batch)
    chosen_tokens = batch["response_mask"].sum(-1).chunk(2)[0]
    expected_nll = -(response_logprobs(policy, batch).chunk(2)[0] / chosen_tokens).mean()
    assert out.metrics["nll/chosen"].item() == pytest.approx(expected_nll.item(), rel=1e-5)
    assert out.metrics["nll/chosen"].item() > 1.0  # an untrained model: several nats per token
    assert out.loss.item() == pytest.approx(math.log(2) + 0.5 * out.metrics["nll/chosen"].item(), rel=1e-5)


def test_reward_model_with_lm_head_starts_as_the_causal_lm_and_saves_a_plain_classifier(tokenizer, init_model, tmp_path):
    from tasks.data.chat_data import PreferencePair

    pairs = [PreferencePair([{"role": "user", "content": f"{a}-{a}?"}], [{"role": "assistant", "content": "It is 0."}],
                            [{"role": "assistant", "content": str(a)}]) for a in range(1, 4)]
    write_examples([encode_pair(tokenizer, p, 128) for p in pairs], LOCAL, str(tmp_path / "d.parquet"))
    batch = PairExamples(LOCAL, str(tmp_path / "d.parquet"), tokenizer.pad_token_id).collate(range(3))
    ids, attention, replies = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    model = RewardModelWithLMHead.from_causal_lm(init_model, tokenizer.pad_token_id).eval()
    real = attention.bool()
    rewards, lm_logits = model(ids, attention, real)
    assert torch.allclose(rewards, sequence_rewards(model.reward, ids, attention))
    causal = AutoModelForCausalLM.from_pretrained(init_model).eval()  # the head reads the final-norm hidden state
    full_logits = causal_logits(causal, ids, attention)
    assert torch.allclose(lm_logits, full_logits[real], atol=1e-5)

    out = PairwiseReward(use_margin=False, lm_weight=0.5).compute(model, batch)
    chosen, rejected = rewards.chunk(2)
    logp = (token_logprobs(full_logits, ids) * replies).sum(-1).chunk(2)[0]  # chosen replies only
    nll = -(logp / replies.sum(-1).chunk(2)[0]).mean()
    assert out.metrics["nll/chosen"].item() == pytest.approx(nll.item(), rel=1e-5) and nll.item() > 1.0
    bt = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert out.loss.item() == pytest.approx(bt.item() + 0.5 * nll.item(), rel=1e-5)

    assert model.lm_head.weight is model.reward.get_input_embeddings().weight  # tied, as in the causal LM
    model.save_pretrained(tmp_path / "rm", state_dict=model.state_dict())  # the release: no LM head
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert not any("lm_head" in name for name in saved.state_dict())
    assert torch.allclose(sequence_rewards(saved, ids, attention), rewards, atol=1e-6)

    torch.manual_seed(1)  # a causal LM with its own output head gets a trained copy of that head
    untied = build_model("tiny", len(tokenizer), pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    untied.save_pretrained(tmp_path / "untied")
    copy = RewardModelWithLMHead.from_causal_lm(tmp_path / "untied", tokenizer.pad_token_id)
    assert copy.lm_head.weight is not copy.reward.get_input_embeddings().weight
    assert torch.equal(copy.lm_head.weight, untied.lm_head.weight)


class _AlternatingScorer(Scorer):
    """Rewards 1, 0, 1, 0 …: every group has reward variance, whatever the tiny model samples."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, "arithmetic", None)

    def __call__(self, rollout, answers):
        return (torch.arange(len(answers)) % 2 == 0).float()


def test_grpo_pushes_up_the_replies_with_positive_advantage(tokenizer, init_model, tmp_path):
    batch = _prompt_batch(tokenizer, tmp_path, [("What is 2 + 3?", "5"), ("What is 4 - 1?", "3")])
    objective = GRPO(_AlternatingScorer(tokenizer), Sampling(6), str(init_model), group_size=4, beta=0.0, clip=0.2)
    objective.prepare(torch.device("cpu"))
    policy = AutoModelForCausalLM.from_pretrained(init_model)
    torch.manual_seed(1)
    captured = {}
    original = objective.experience
    objective.experience = lambda *a, **k: captured.setdefault("exp", original(*a, **k))
    out = objective.compute(policy, batch)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)  # ratio 1 and zero-mean advantages
    assert out.metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert out.metrics["reward/mean"].item() == 0.5
    exp = captured["exp"]
    mask = exp.rollout.response_mask

    def reply_logprobs():
        logits = causal_logits(policy, exp.rollout.sequences, exp.rollout.attention_mask)
        return (token_logprobs(logits, exp.rollout.sequences) * mask).sum(-1) / mask.sum(-1)

    before = reply_logprobs().detach()
    out.loss.backward()
    torch.optim.SGD(policy.parameters(), lr=0.5).step()
    change = reply_logprobs().detach() - before
    rewarded = torch.arange(8) % 2 == 0
    assert change[rewarded].mean() > change[~rewarded].mean()


def test_ppo_reuses_a_rollout_for_its_epochs_then_samples_again(tokenizer, init_model, tmp_path):
    batch = _prompt_batch(tokenizer, tmp_path, [("What is 2 + 3?", "5"), ("What is 4 - 1?", "3")])
    settings = align.PPOSettings(epochs=2)
    objective = PPO(_AlternatingScorer(tokenizer), Sampling(5), str(init_model), settings, grad_accum=1)
    objective.prepare(torch.device("cpu"))
    policy = PolicyWithValueHead.from_pretrained(init_model)
    sampled = []
    original = objective.experience
    objective.experience = lambda *a, **k: sampled.append(1) or original(*a, **k)
    first = objective.compute(policy, batch)
    assert first.metrics["clip_fraction"].item() == 0.0 and first.metrics["approx_kl"].item() == pytest.approx(0.0, abs=1e-8)
    first.loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    second = objective.compute(policy, batch)  # epoch 2: the same rollout, a moved policy
    assert len(sampled) == 1 and second.metrics["approx_kl"].item() > 0
    with torch.no_grad():
        objective.compute(policy, batch)  # validation samples afresh and leaves the epoch count alone
    assert len(sampled) == 2
    objective.compute(policy, batch)  # the next rollout batch
    assert len(sampled) == 3


def test_ppo_update_pushes_up_the_rewarded_replies(tokenizer, init_model, tmp_path):
    batch = _prompt_batch(tokenizer, tmp_path, [("What is 2 + 3?", "5"), ("What is 4 - 1?", "3"), ("What is 6 + 1?", "7"), ("What is 9 - 8?", "1")])
    settings = align.PPOSettings(epochs=1, kl_coef=0.05)
    objective = PPO(_AlternatingScorer(tokenizer), Sampling(5), str(init_model), settings, grad_accum=1)
    objective.prepare(torch.device("cpu"))
    policy = PolicyWithValueHead.from_pretrained(init_model)
    torch.manual_seed(2)
    captured = {}
    original = objective.rollout
    objective.rollout = lambda *a, **k: captured.setdefault("data", original(*a, **k))
    out = objective.compute(policy, batch)
    data = captured["data"]
    rewarded = torch.arange(len(data["score"])) % 2 == 0
    assert data["score"][rewarded].tolist() == [1.0, 1.0] and data["kl"].abs().max().item() < 1e-5  # policy = reference
    advantage = (data["advantages"] * data["mask"]).sum(-1) / data["mask"].sum(-1)
    assert advantage[rewarded].min() > advantage[~rewarded].max()  # the scored replies lead, token by token

    def reply_logprobs():
        _, logp, _ = policy_and_values(policy, data["sequences"], data["attention_mask"])
        P = data["sequences"].shape[1] - data["mask"].shape[1]
        return (logp[:, P:] * data["mask"]).sum(-1) / data["mask"].sum(-1)

    before = reply_logprobs().detach()
    out.loss.backward()
    torch.optim.SGD(policy.parameters(), lr=0.5).step()
    change = reply_logprobs().detach() - before
    assert change[rewarded].mean() > change[~rewarded].mean() + 0.05


def test_generation_stops_at_the_first_stop_token(tokenizer, init_model):
    model = AutoModelForCausalLM.from_pretrained(init_model).eval()
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])])
    free = generate(model, ids, torch.ones_like(ids), Sampling(6, greedy=True), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    reply = free.sequences[0, ids.shape[1]:].tolist()
    stop = reply[2]
    first = reply.index(stop)
    stopped = generate(model, ids, torch.ones_like(ids), Sampling(6, greedy=True), [stop], tokenizer.pad_token_id)
    mask = stopped.response_mask[0, ids.shape[1]:].tolist()
    assert mask[: first + 1] == [1] * (first + 1) and sum(mask) == first + 1
    assert stopped.attention_mask[0, : ids.shape[1]].all()


# ---------------------------------------------------------------------------------- stages


SMALL = {"batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1, "eval_batches": 1, "max_length": 160}


TOY_SUMS = [(a, b) for a in range(2, 10) for b in range(1, 7)]  # 48 sums with one-digit terms
REFUSAL = "No. Work it out yourself."
TOY_SFT_STEPS = 300
# GRPO and PPO on the toy policy: 8 prompts a step, replies of up to 24 tokens (the refusal takes 17),
# the held-out split measured with 8 sampled replies per prompt, drawn alike before and after.
TOY_RL = {**SMALL, "batch_size": 8, "lr": 3e-4, "eval_tokens": 24, "eval_samples": 8, "sampling": {"max_new_tokens": 24}}
PPO_KL_TARGET = 3.0  # summed over a reply's tokens


def _worked(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def _toy_preferences(folder: Path) -> tuple[Path, Path]:
    """Pairs a reward model can separate: a worked sum is preferred to a curt refusal to answer.
    The held-out pairs ask other sums."""
    def pair(a: int, b: int) -> dict:
        return {"prompt": f"What is {a} + {b}?", "chosen": _worked(a, b), "rejected": REFUSAL}
    train = [pair(a, b) for a, b in TOY_SUMS]
    held = [pair(a, b) for a in range(11, 15) for b in range(21, 25)]  # 16 pairs, numbers never trained on
    return _jsonl(folder / "toy_train.jsonl", train), _jsonl(folder / "toy_heldout.jsonl", held)


def _tracked_run(root: Path) -> tuple[str, str]:
    """(tracking URI, run id): a run in an MLflow database of its own under ``root``."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, MlflowClient(uri).create_run(experiment_id(uri, "post")).info.run_id


@pytest.fixture(scope="module")
def chain(demo_data, init_model, ray_session, tmp_path_factory, stage_alone):
    """sft (packed, a bad row in its data) → reward → align: dpo, a few steps each."""
    root = tmp_path_factory.mktemp("store")
    sft_data = demo_data / "sft_with_bad_row.jsonl"
    sft_data.write_text((demo_data / "sft_train.jsonl").read_text() + '{"messages": []}\n')
    n_lines = len(sft_data.read_text().splitlines())
    sft_cfg = sft.SFTConfig(
        init_from=str(init_model), data=[{"name": "chat", "path": str(sft_data)}], val_fraction=0.1, packing=True,
        steps=8, eval_every=8, sample_tokens=4, **SMALL,
    )
    sft_result, sft_out, sft_manifest = stage_alone(sft, root, "sft", sft_cfg, {})
    prefs = [{"name": "prefs", "path": str(demo_data / "preference_train.jsonl")}]
    held = [{"name": "prefs", "path": str(demo_data / "preference_heldout.jsonl")}]
    toy_train, toy_held = _toy_preferences(root)
    rm_cfg = reward.RewardConfig(data=[{"name": "toy", "path": str(toy_train)}], validation=[{"name": "toy", "path": str(toy_held)}],
                                 steps=12, eval_every=12, lm_weight=1.0, **SMALL)
    rm_result, rm_out, rm_manifest = stage_alone(reward, root, "reward", rm_cfg, {"sft": sft_manifest})
    upstream = {"sft": sft_manifest, "reward": rm_manifest}
    # DPO's worker is killed before step 4 (the latest checkpoint is step 2) and Ray Train restarts it
    dpo_cfg = align.AlignConfig(
        method="dpo", data=prefs, validation=held, steps=4, eval_every=4, checkpoint_every=2, max_failures=1, **SMALL
    )
    uri, run_id = _tracked_run(root)
    os.environ[FAULT_ENV] = "4"
    try:
        dpo_result, dpo_out, _ = stage_alone(align, root, "align", dpo_cfg, upstream, run_id=run_id, uri=uri)
    finally:
        del os.environ[FAULT_ENV]
    return {
        "root": root, "upstream": upstream, "sft": (sft_result, sft_out), "reward": (rm_result, rm_out),
        "dpo": (dpo_result, dpo_out), "dpo_run": (uri, run_id), "sft_lines": n_lines,
    }


def test_sft_learns_the_assistant_tokens_and_exports_a_chat_model(chain):
    result, out = chain["sft"]
    assert result.metrics["heldout/loss"] < result.metrics["heldout/loss_init"] - 0.3
    quarantine = pq.read_table(out.path("quarantine/quarantine.parquet")).to_pylist()
    assert result.counts["quarantined"] == len(quarantine) >= 2
    malformed = [q for q in quarantine if "must be a non-empty list" in q["error"]]
    assert len(malformed) == 1 and malformed[0]["line"] == chain["sft_lines"]
    too_long = [q for q in quarantine if "more than max_length 160" in q["error"]]  # never cut, never dropped silently
    assert len(too_long) == len(quarantine) - 1 and all(q["raw"].startswith("chat/") for q in too_long)
    assert result.counts["train_rows"] < result.counts["train_examples"] / 2  # packed
    assert result.counts["train_examples"] + result.counts["validation_examples"] + len(quarantine) == chain["sft_lines"]
    tokenizer = AutoTokenizer.from_pretrained(out.path("model"))
    assert "generation" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(out.path("model"))
    assert model.config.vocab_size == len(tokenizer)
    samples = [json.loads(line) for line in Path(out.path("samples.jsonl")).read_text().splitlines()]
    assert len(samples) == 8 and all({"prompt", "reply", "reference"} <= set(s) for s in samples)


def test_reward_model_loads_as_sequence_classifier_and_scores_pairs(chain):
    result, out = chain["reward"]
    model = AutoModelForSequenceClassification.from_pretrained(out.path("model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(out.path("model"))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], return_tensors="pt", return_dict=True)
    assert model(**ids).logits.shape == (1, 1)
    for key in ("heldout/accuracy", "heldout/reward_gap", "train/accuracy", "val/accuracy", "train/reward_gap", "train/nll/chosen"):
        assert key in result.metrics, key
    assert not any("lm_head" in name for name in model.state_dict())  # the LM head regularises training only
    # a separable toy set: the held-out pairs (sums never seen) are ranked right, by a clear gap
    assert result.metrics["heldout/accuracy"] >= 0.9, result.metrics
    assert result.metrics["heldout/reward_gap"] > 0.5, result.metrics
    bradley_terry = result.metrics["train/loss"] - 1.0 * result.metrics["train/nll/chosen"]  # lm_weight 1.0
    assert bradley_terry < math.log(2) + 0.05


def test_dpo_logs_margins_and_moves_away_from_the_reference(chain):
    result, out = chain["dpo"]
    m = result.metrics
    assert m["heldout/rewards/accuracy_sft"] == 0.5 and m["heldout/rewards/margin_sft"] == 0.0  # SFT vs itself
    for key in ("train/rewards/margin", "train/rewards/accuracy", "train/logps/chosen", "train/logps/rejected", "val/rewards/margin"):
        assert key in m, key
    assert m["heldout/rewards/chosen"] != 0.0  # the policy left the reference
    # the implicit-reward margin on held-out pairs (zero for the SFT model against itself) widened
    assert m["heldout/rewards/margin"] > m["heldout/rewards/margin_sft"] + 0.005, m
    assert m["heldout/rewards/chosen"] > m["heldout/rewards/rejected"]
    model = AutoModelForCausalLM.from_pretrained(out.path("model"))
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out.path("model")))


@pytest.fixture(scope="module")
def toy_policy(tokenizer, init_model, tmp_path_factory):
    """A policy that is sometimes right: the untrained model taught in process (no Ray) to answer
    each of the toy sums, half the time worked out (and then often right) and half the time with
    the refusal the toy reward model ranks low. GRPO and PPO train on 36 of the sums and measure
    the 12 others (every fourth), whose answers the policy learnt as well as the rest."""
    from tasks.train.sft_objective import AssistantTokens

    folder = tmp_path_factory.mktemp("toy")
    chats = [[{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": reply}]
             for a, b in TOY_SUMS for reply in (_worked(a, b), REFUSAL)]
    write_examples([encode_conversation(tokenizer, c, 64) for c in chats], LOCAL, str(folder / "sft.parquet"))
    examples = ChatExamples(LOCAL, str(folder / "sft.parquet"), tokenizer.pad_token_id, packed=False)
    model = AutoModelForCausalLM.from_pretrained(init_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    order = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread, and loses much on busy cores
    try:
        for _ in range(TOY_SFT_STEPS):
            batch = examples.collate(torch.randperm(len(examples), generator=order)[:32].tolist())
            AssistantTokens().compute(model, batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder / "model")
    save_tokenizer(tokenizer, folder / "model")
    prompts = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in TOY_SUMS]
    return {
        "model": str(folder / "model"),
        "data": [{"name": "sums", "path": str(_jsonl(folder / "train.jsonl", [p for i, p in enumerate(prompts) if i % 4]))}],
        "validation": [{"name": "sums", "path": str(_jsonl(folder / "heldout.jsonl", prompts[::4]))}],
    }


def _mean(history: list, steps: range) -> float:
    values = [m.value for m in history if m.step in steps]
    return sum(values) / len(values)


def test_grpo_with_the_arithmetic_verifier_raises_the_verified_reward(toy_policy, ray_session, stage_alone, tmp_path):
    cfg = align.AlignConfig(method="grpo", reward="arithmetic", init_from=toy_policy["model"], data=toy_policy["data"],
                            validation=toy_policy["validation"], grpo={"group_size": 4}, steps=32, eval_every=32, **TOY_RL)
    uri, run_id = _tracked_run(tmp_path)
    result, out, _ = stage_alone(align, tmp_path, "align", cfg, {}, run_id=run_id, uri=uri)
    m = result.metrics
    rewards = MlflowClient(uri).get_metric_history(run_id, "train/reward/mean")
    assert _mean(rewards, range(25, 33)) > _mean(rewards, range(1, 9)) + 0.1, [r.value for r in rewards]  # over its steps
    # on the held-out sums too, compared on the same random draws
    assert m["heldout/sampled_exact_match"] > m["heldout/sampled_exact_match_sft"] + 0.1, m

    # The held-out measure again, by hand: sampling from the top token alone is greedy decoding,
    # and the same seed draws the same replies.
    tokenizer = AutoTokenizer.from_pretrained(out.path("model"))
    examples = PromptExamples(pafs.LocalFileSystem(), out.path("data/validation.parquet"), tokenizer.pad_token_id)
    scorer = Scorer(tokenizer, "arithmetic", None)
    tokens = TOY_RL["eval_tokens"]
    measure = functools.partial(generation_metrics, out.path("model"), scorer, examples, tokens, 8)
    top_only = measure(Sampling(tokens, top_k=1), 3)
    assert top_only["heldout/sampled_exact_match"] == top_only["heldout/exact_match"] == m["heldout/exact_match"]
    assert measure(Sampling(tokens), 2, 7) == measure(Sampling(tokens), 2, 7)


def test_ppo_with_the_reward_model_raises_the_held_out_reward_within_the_kl_target(chain, toy_policy, stage_alone, tmp_path):
    cfg = align.AlignConfig(method="ppo", init_from=toy_policy["model"], data=toy_policy["data"],
                            validation=toy_policy["validation"], ppo={"epochs": 2, "kl_target": PPO_KL_TARGET}, steps=16,
                            eval_every=16, **TOY_RL)
    uri, run_id = _tracked_run(tmp_path)
    result, out, _ = stage_alone(align, tmp_path, "align", cfg, {"reward": chain["upstream"]["reward"]}, run_id=run_id, uri=uri)
    m = result.metrics
    # the reward model prefers worked sums: the policy refuses less, on prompts it never trained on
    assert m["heldout/sampled_reward"] > m["heldout/sampled_reward_sft"] + 0.2, m
    kl = [h.value for h in MlflowClient(uri).get_metric_history(run_id, "train/kl")]
    assert len(kl) == 16 and max(kl) < PPO_KL_TARGET, kl
    # under the target all along, the adaptive coefficient only moved down from 0.05; step 16 is a
    # rollout's second epoch, taken by a policy that moved off the one that sampled it
    assert m["train/kl_coef"] < 0.05 and m["train/approx_kl"] > 0
    from safetensors import safe_open

    with safe_open(out.path("model/model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "value_head" in k]
    AutoModelForCausalLM.from_pretrained(out.path("model"))


def test_killed_dpo_worker_resumed_from_the_latest_checkpoint_and_registered(chain):
    uri, run_id = chain["dpo_run"]
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")]
    assert {s: steps.count(s) for s in (1, 2, 3, 4)} == {1: 1, 2: 1, 3: 2, 4: 1}  # step 3 ran twice, 1-2 once
    version = MlflowClient(uri).get_model_version_by_alias("post", "aligned")
    assert version.run_id == run_id and version.source.endswith("/align/fp/model")
