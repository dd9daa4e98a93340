"""Fine-tuning open-weight checkpoints: post-training-only pipelines, the checkpoint's own chat
template, LoRA (adapters on, off for the reference, merged for export) on several architecture
families, and several workers under DDP, FSDP and DeepSpeed ZeRO-3."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models.chat import CHAT_TEMPLATE
from models.tokenizer import encode_chat, load_tokenizer, save_tokenizer
from tasks.config import validate_config
from tasks.engine import plan, run_pipeline
from tasks.errors import ConfigError
from tasks.train.lora import add_lora, base_weights, merge_adapters
from tasks.tracking import tracking_uri
from tasks.train.post_config import LoraSettings

# A ChatML-style template with no {% generation %} blocks, written with plain-text markers so it
# adds no tokens: the shape of most open-weight checkpoints' templates.
CHATML = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does `math.sqrt` do?"},
    {"role": "assistant", "content": "Return the square root of x."},
    {"role": "user", "content": "And `math.floor`?"},
    {"role": "assistant", "content": "Return the floor of x as an Integral."},
]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}
FAMILIES = {
    "llama": ("llama", TINY),
    "qwen2": ("qwen2", TINY),
    "mistral": ("mistral", TINY),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512}),
}
LORA = {"r": 4, "alpha": 8.0}
STEPS = {"batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "log_every": 1, "eval_batches": 1, "max_length": 192,
         "checkpoint_every": 100}


@pytest.fixture(scope="module")
def demo_data(demo_chat_cut):
    """The demo chat and preference data, cut to 96 training and 16 held-out rows per set."""
    return demo_chat_cut(96)


@pytest.fixture(scope="module")
def tokenizer(demo_data, train_chat_tokenizer):
    return train_chat_tokenizer(demo_data, 500)


def _checkpoint(folder: Path, family: str, tokenizer, template: str | None) -> Path:
    """A tiny random checkpoint of ``family`` with ``tokenizer`` (and ``template``) saved beside it."""
    model_type, sizes = FAMILIES[family]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    copy = AutoTokenizer.from_pretrained(_save(tokenizer, folder))
    copy.chat_template = template
    copy.save_pretrained(folder)
    if template is None:
        config_path = folder / "tokenizer_config.json"
        data = json.loads(config_path.read_text())
        data.pop("chat_template", None)
        config_path.write_text(json.dumps(data))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def _save(tokenizer, folder: Path) -> Path:
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """One tiny checkpoint per family, each shipping the ChatML template (no generation blocks)."""
    return {f: _checkpoint(tmp_path_factory.mktemp(f), f, tokenizer, CHATML) for f in FAMILIES}


# ---------------------------------------------------------------------------------- templates


def test_assistant_mask_without_generation_blocks_matches_the_marked_template(tokenizer, tmp_path):
    marked = tokenizer
    unmarked = AutoTokenizer.from_pretrained(_save(tokenizer, tmp_path))
    unmarked.chat_template = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    for messages in (CONVERSATION, CONVERSATION[1:3]):
        assert encode_chat(unmarked, messages) == encode_chat(marked, messages)
    ids, mask = encode_chat(unmarked, CONVERSATION)
    assert sum(mask) > 0 and unmarked.decode([t for t, m in zip(ids, mask) if m]) == (
        "Return the square root of x.<|end|>Return the floor of x as an Integral.<|end|>"
    )


def test_chatml_mask_covers_each_reply_and_its_end_marker(checkpoints):
    shipped, added = load_tokenizer(checkpoints["llama"], missing="error")
    assert added == [] and shipped.chat_template == CHATML
    ids, mask = encode_chat(shipped, CONVERSATION)
    assert shipped.decode([t for t, m in zip(ids, mask) if m]) == (
        "Return the square root of x.<|im_end|>Return the floor of x as an Integral.<|im_end|>"
    )
    prompt, _ = encode_chat(shipped, CONVERSATION[:2], add_generation_prompt=True)
    assert shipped.decode(prompt).endswith("<|im_start|>assistant\n")


def test_a_checkpoint_without_a_template_needs_one_from_the_config(tokenizer, tmp_path, demo_data, tmp_home):
    bare = _checkpoint(tmp_path / "bare", "llama", tokenizer, None)
    cfg = _config(tmp_path, bare, demo_data, sft={})
    with pytest.raises(ConfigError, match=r"sft.chat_template.*has no chat template.*crucible"):
        run_pipeline(cfg)
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML)
    given = _config(tmp_path, bare, demo_data, sft={"chat_template": str(template_file), "steps": 2})
    run_pipeline(given)
    saved = AutoTokenizer.from_pretrained(Path(plan(given)["sft"].out.path("model")))
    assert saved.chat_template == CHATML


# ---------------------------------------------------------------------------------- LoRA


def test_merged_lora_model_computes_what_the_adapters_do(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    base_logits = model(torch.arange(12)[None]).logits
    peft_model = add_lora(model, LoraSettings(r=4))
    with torch.no_grad():  # move the adapters off their zero start
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    adapted = peft_model(torch.arange(12)[None]).logits
    with base_weights(peft_model):
        assert torch.allclose(peft_model(torch.arange(12)[None]).logits, base_logits, atol=1e-6)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merged = merge_adapters(peft_model)
    assert not isinstance(merged, PeftModel)
    assert torch.allclose(merged(torch.arange(12)[None]).logits, adapted, atol=1e-5)


# ---------------------------------------------------------------------------------- pipelines


def _config(tmp_path: Path, start: Path, data: Path, *, sft: dict | None = None, align: dict | None = None,
            name: str = "ft", align_validation: str = "preference_heldout.jsonl", **extra):
    sections: dict = {"name": name, "store": str(tmp_path / "store"), "ray": {"num_cpus": 2}}
    if sft is not None:
        sections["sft"] = {"init_from": str(start), "data": [{"name": "chat", "path": str(data / "sft_train.jsonl")}],
                           "validation": [{"name": "chat", "path": str(data / "sft_heldout.jsonl")}],
                           "steps": 6, "eval_every": 6, "sample_tokens": 4, **STEPS, **sft}
    if align is not None:
        sections["align"] = {"method": "dpo", "data": [{"name": "prefs", "path": str(data / "preference_train.jsonl")}],
                             "validation": [{"name": "prefs", "path": str(data / align_validation)}],
                             "steps": 6, "eval_every": 6, **STEPS, **align}
        if sft is None:
            sections["align"]["init_from"] = str(start)
    return validate_config({**sections, **extra}, "test")


def test_post_training_only_config_needs_init_from(tmp_path, demo_data, checkpoints, tmp_home):
    with pytest.raises(ConfigError, match=r"stage 'sft' needs the section\(s\) pretrain \(or sft.init_from"):
        validate_config({"name": "x", "sft": {"data": [{"name": "c", "path": "x.jsonl"}]}}, "test")
    with pytest.raises(ConfigError, match=r"stage 'align' needs the section\(s\) sft"):
        validate_config({"name": "x", "align": {"data": [{"name": "c", "path": "x.jsonl"}]}}, "test")
    grpo = {"name": "x", "align": {"init_from": "m", "method": "grpo", "data": [{"name": "c", "path": "x.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"stage 'align' needs the section\(s\) reward"):
        validate_config(grpo, "test")
    cfg = _config(tmp_path, checkpoints["llama"], demo_data, sft={}, align={})
    assert cfg.configured_stages() == ["sft", "align"]
    planned = plan(cfg)
    assert planned["sft"].upstream == {} and planned["align"].upstream == {"sft": planned["sft"].fingerprint}


@pytest.mark.slow
def test_lora_sft_then_dpo_from_a_checkpoint_and_the_same_weights_elsewhere_reuse_everything(
    tmp_path, demo_data, checkpoints, ray_session, tmp_home,
):
    start = checkpoints["llama"]
    # DPO is measured on its training pairs: a random 2-layer model learns them in a few steps but
    # cannot generalise to new ones, and what is tested here is that the adapters learn at all.
    stages = {"sft": {"lora": LORA}, "align": {"lora": LORA, "lr": 2e-2}, "align_validation": "preference_train.jsonl"}
    outcomes = run_pipeline(_config(tmp_path, start, demo_data, **stages))
    assert [(o.stage, o.state) for o in outcomes] == [("sft", "ran"), ("align", "ran")]
    sft_m, align_m = outcomes[0].manifest, outcomes[1].manifest
    assert sft_m.metrics["heldout/loss"] < sft_m.metrics["heldout/loss_init"]
    assert align_m.metrics["heldout/rewards/margin"] > 0 and align_m.metrics["heldout/rewards/accuracy"] > 0.5
    for m, base in ((sft_m, start), (align_m, Path(sft_m.path) / "model")):  # DPO's adapters sit on the SFT model
        folder = Path(m.path)
        merged = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder / "adapter").eval()
        ids = torch.arange(3, 40)[None]
        with torch.no_grad():
            assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        assert (folder / "adapter" / "adapter_config.json").exists()

    client = MlflowClient(tracking_uri(None))
    for alias, manifest in (("sft", sft_m), ("aligned", align_m)):  # the merged model and the adapters
        for name, folder in (("ft", "model"), ("ft-adapter", "adapter")):
            version = client.get_model_version_by_alias(name, alias)
            assert version.source.endswith(f"{Path(manifest.path).name}/{folder}")
    from tasks.eval.evaluate import EvaluateConfig, model_specs

    card = EvaluateConfig(suites=[{"name": "math", "kind": "exact_match", "path": "math.jsonl"}])
    assert [s.name for s in model_specs(card, {"sft": sft_m, "align": align_m})] == ["sft", "align"]  # no untrained floor

    moved = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(start, moved)
    again = run_pipeline(_config(tmp_path, moved, demo_data, **stages))
    assert [(o.stage, o.state) for o in again] == [("sft", "cached"), ("align", "cached")]


def _sft_and_dpo(stage_alone, root: Path, start: Path, data: Path, **settings):
    """LoRA SFT then LoRA DPO from ``start``, nothing held out (the test measures on training data)."""
    from tasks.train import align, sft

    chat = {"data": [{"name": "chat", "path": str(data / "sft_train.jsonl")}], "val_fraction": 0.0}
    few = root / "prefs.jsonl"  # 8 pairs, each seen twice in 4 steps of 4
    root.mkdir(parents=True, exist_ok=True)
    few.write_text("".join((data / "preference_train.jsonl").read_text().splitlines(keepends=True)[:8]))
    prefs = {"data": [{"name": "prefs", "path": str(few)}], "val_fraction": 0.0}
    common = {**STEPS, "steps": 4, "eval_every": 4, "lora": LORA, "lr": 3e-2, **settings}
    sft_result, _, sft_manifest = stage_alone(sft, root / "sft", "sft", sft.SFTConfig(init_from=str(start), **chat, **common), {})
    dpo_result, _, dpo_manifest = stage_alone(
        align, root / "align", "align", align.AlignConfig(method="dpo", **prefs, **{**common, "lr": 1e-2}), {"sft": sft_manifest},
    )
    return (sft_result, sft_manifest), (dpo_result, dpo_manifest)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "strategy"), [
    ("qwen2", {"kind": "ddp"}), ("mistral", {"kind": "fsdp"}), ("gpt2", {"kind": "deepspeed", "zero_stage": 3}),
], ids=["qwen2-ddp", "mistral-fsdp", "gpt2-zero3"])
def test_lora_sft_and_dpo_per_family_on_two_workers(family, strategy, checkpoints, demo_data, tmp_path, ray_session, stage_alone):
    """Each family through SFT and DPO with LoRA, on two workers (half the global batch each) under
    another strategy: DPO's reference (the adapters switched off) runs through the sharded model on
    every rank, and the export gathers the shards into one merged folder and one adapter folder."""
    import pyarrow.fs as pafs

    from tasks.train.dpo import preference_metrics
    from tasks.train.post_data import ChatExamples, PairExamples
    from tasks.train.sft_objective import assistant_loss

    two = {"num_workers": 2, "batch_size": 2, "strategy": strategy}
    (_, sft_manifest), (_, dpo_manifest) = _sft_and_dpo(stage_alone, tmp_path, checkpoints[family], demo_data, **two)
    sft_model, dpo_model = Path(sft_manifest.path) / "model", Path(dpo_manifest.path) / "model"
    pad = AutoTokenizer.from_pretrained(sft_model).pad_token_id
    chats = ChatExamples(pafs.LocalFileSystem(), str(Path(sft_manifest.path) / "data/train.parquet"), pad, packed=False)
    assert assistant_loss(str(sft_model), chats, 16) < assistant_loss(str(checkpoints[family]), chats, 16) - 0.05
    pairs = PairExamples(pafs.LocalFileSystem(), str(Path(dpo_manifest.path) / "data/train.parquet"), pad)
    assert preference_metrics(str(dpo_model), str(sft_model), pairs, 0.1, 16)["heldout/rewards/margin"] > 0
    for manifest, base in ((sft_manifest, checkpoints[family]), (dpo_manifest, sft_model)):
        folder = Path(manifest.path)
        assert AutoConfig.from_pretrained(folder / "model").model_type == FAMILIES[family][0]
        assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == LORA["r"]
        assert AutoTokenizer.from_pretrained(folder / "model").chat_template == CHATML
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
        ids = torch.arange(3, 40)[None]
        with torch.no_grad():
            assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def _stage_settings(stage: str, data: Path) -> tuple[object, dict]:
    from tasks.train import align, reward

    def source(name: str, file: str) -> dict:
        return {"data": [{"name": name, "path": str(data / file)}], "val_fraction": 0.0}

    sampling = {"sampling": {"max_new_tokens": 6}, "max_prompt_length": 96}
    return {
        "reward": (reward.RewardConfig, source("prefs", "preference_train.jsonl")),
        "grpo": (align.AlignConfig, {**source("math", "prompts_train.jsonl"), "method": "grpo", "reward": "arithmetic",
                                     "grpo": {"group_size": 2}, **sampling}),
        "ppo": (align.AlignConfig, {**source("math", "prompts_train.jsonl"), "method": "ppo", "reward": "arithmetic",
                                    "ppo": {"epochs": 2, "kl_target": 0.01, "kl_horizon": 100}, **sampling}),
    }[stage]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "ppo"])
def test_a_killed_worker_resumes_and_ends_where_an_undisturbed_run_ends(
    stage, checkpoints, demo_data, tmp_path, ray_session, monkeypatch, stage_alone,
):
    """Step 3 of 4 kills the worker; Ray Train restarts it from the step-2 checkpoint (weights,
    optimizer, data position, RNG, PPO's KL coefficient and rollout batch) and the exported model
    equals the one an undisturbed run exports.

    A pair-based stage and a rollout-based one: the reward model (a sequence classifier, its own
    weights to restore and export) and PPO (sampling that needs the RNG restored, a value head,
    the objective's state). SFT restores nothing a causal LM's next-token run does not (its resume
    is tested in test_train, test_pretrain and DPO's in test_post_training), and GRPO nothing PPO
    does not (the same sampling, no state of its own)."""
    from safetensors.torch import load_file

    from tasks.train import align, reward
    from tasks.train.loop import FAULT_ENV

    make, settings = _stage_settings(stage, demo_data)
    module = reward if stage == "reward" else align
    cfg = make(init_from=str(checkpoints["llama"]), **settings, **{**STEPS, "batch_size": 2, "steps": 4,
               "eval_every": 4, "checkpoint_every": 2, "max_failures": 1})
    undisturbed, _, plain = stage_alone(module, tmp_path / "plain", stage, cfg, {})
    monkeypatch.setenv(FAULT_ENV, "3")
    resumed, _, killed = stage_alone(module, tmp_path / "killed", stage, cfg, {})
    first, second = (load_file(Path(m.path) / "model" / "model.safetensors") for m in (plain, killed))
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    assert resumed.metrics["train/loss"] == pytest.approx(undisturbed.metrics["train/loss"], abs=1e-5)
    if stage == "ppo":
        assert resumed.metrics["train/kl_coef"] == pytest.approx(undisturbed.metrics["train/kl_coef"], rel=1e-6)
        assert resumed.metrics["train/kl_coef"] != 0.05  # it adapted, and the resumed run kept it


def test_training_examples_sharing_an_ngram_with_an_eval_set_are_rejected_with_the_reason(tmp_path):
    from tasks.data.chat_data import load_examples
    from tasks.train import align, sft
    from tasks.train.post_stage import decontaminate

    leaked = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": f"Q: {leaked.upper()}?", "answer": "x"}) + "\n")
    chats = [
        {"id": "clean", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
        {"id": "reply", "messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": f"Well, {leaked}."}]},
        {"id": "short", "messages": [{"role": "user", "content": "the quick brown fox jumps over"}, {"role": "assistant", "content": "ok"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pairs = [{"prompt": f"Repeat: {leaked}", "chosen": "a", "rejected": "b"}, {"prompt": "Fine?", "chosen": "yes", "rejected": "no"}]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    decon = {"files": [{"path": str(tmp_path / "eval.jsonl"), "text_fields": ["question"]}]}

    cfg = sft.SFTConfig(data=[{"name": "chat", "path": str(tmp_path / "chat.jsonl")}], decontamination=decon)
    kept, rejected = decontaminate(cfg, "sft", load_examples(cfg.data, "chat", "sft.data").rows)
    assert [e.id for e in kept] == ["chat/clean", "chat/short"]  # five shared words are not a 13-gram
    assert rejected == [{"id": "chat/reply", "source": "chat", "file": "chat.jsonl", "line": 2, "reason": "decontamination"}]
    prefs = align.AlignConfig(data=[{"name": "p", "path": str(tmp_path / "prefs.jsonl")}], decontamination=decon)
    kept, rejected = decontaminate(prefs, "align", load_examples(prefs.data, "preference", "align.data").rows)
    assert [e.id for e in kept] == ["p/prefs.jsonl:2"] and [r["line"] for r in rejected] == [1]
    missing = {"files": [{"path": str(tmp_path / "none.jsonl")}]}
    with pytest.raises(ConfigError, match=r"sft.decontamination.files\[0\].path: no such file"):
        sft.sft_inputs(sft.SFTConfig(data=cfg.data, decontamination=missing), None)


@pytest.mark.slow
@pytest.mark.timeout(400)  # a rank that stopped generating early would leave the other waiting: fail, not hang
@pytest.mark.parametrize(("stage", "strategy"), [
    ("reward", {"kind": "fsdp"}), ("reward", {"kind": "deepspeed", "zero_stage": 3}),
    ("grpo", {"kind": "fsdp"}), ("grpo", {"kind": "deepspeed", "zero_stage": 3}),
    ("ppo", {"kind": "ddp"}), ("ppo", {"kind": "fsdp"}), ("ppo", {"kind": "deepspeed", "zero_stage": 3}),
], ids=["reward-fsdp", "reward-zero3", "grpo-fsdp", "grpo-zero3", "ppo-ddp", "ppo-fsdp", "ppo-zero3"])
def test_lora_reward_grpo_and_ppo_on_two_workers(stage, strategy, checkpoints, demo_data, tmp_path, ray_session, stage_alone):
    """Replies end at different lengths on the two ranks (sampling), yet every rank takes part in
    every forward of the sharded model until the last reply stops; the exports load as released.

    Each stage under each sharded strategy (its wrapper sharded as its own unit, gathered for the
    export). Under DDP nothing is sharded: PPO covers LoRA's reference forward through the DDP
    wrapper and synced sampling, which GRPO shares; the reward model on two DDP workers is in
    test_two_workers_follow_the_one_worker_loss_for_the_same_global_batch, and LoRA exports under
    DDP in test_lora_sft_and_dpo_per_family_on_two_workers."""
    from transformers import AutoModelForSequenceClassification

    from tasks.train import align, reward

    make, settings = _stage_settings(stage, demo_data)
    module = reward if stage == "reward" else align
    cfg = make(init_from=str(checkpoints["llama"]), lora=LORA, **settings,
               **{**STEPS, "batch_size": 2, "steps": 2, "num_workers": 2, "strategy": strategy})
    result, out, _ = stage_alone(module, tmp_path, stage, cfg, {})
    folder = Path(out.path("model"))
    assert json.loads((folder.parent / "adapter" / "adapter_config.json").read_text())["r"] == LORA["r"]
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_labels == 1
        assert set(json.loads((folder.parent / "adapter" / "adapter_config.json").read_text())["modules_to_save"]) & {"score", "classifier"}
    else:
        AutoModelForCausalLM.from_pretrained(folder)
        assert result.metrics["train/kl"] >= 0 and math.isfinite(result.metrics["train/loss"])


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "tolerance"), [("sft", 0.03), ("reward", 1e-4), ("dpo", 1e-4)])
def test_two_workers_follow_the_one_worker_loss_for_the_same_global_batch(stage, tolerance, checkpoints, demo_data, tmp_path, ray_session, stage_alone):
    """4 sequences per step on one worker, or 2 on each of two: the same examples in every step.
    Reward and DPO losses are means over pairs, so they agree to rounding; SFT's is a mean over
    each worker's assistant tokens, so two workers weight the step's conversations a little
    differently (stated tolerance: 3% relative after 3 steps)."""
    from tasks.train import align, reward, sft

    chat = {"data": [{"name": "chat", "path": str(demo_data / "sft_train.jsonl")}], "val_fraction": 0.0}
    prefs = {"data": [{"name": "prefs", "path": str(demo_data / "preference_train.jsonl")}], "val_fraction": 0.0}
    make, module, data = {
        "sft": (sft.SFTConfig, sft, chat), "reward": (reward.RewardConfig, reward, prefs),
        "dpo": (functools.partial(align.AlignConfig, method="dpo"), align, prefs),
    }[stage]
    losses = []
    for workers in (1, 2):
        cfg = make(init_from=str(checkpoints["llama"]), **data,
                   **{**STEPS, "steps": 3, "eval_every": 3, "num_workers": workers, "batch_size": 4 // workers})
        result, _, _ = stage_alone(module, tmp_path / str(workers), stage, cfg, {})
        losses.append(result.metrics["train/loss"])
    assert losses[1] == pytest.approx(losses[0], rel=tolerance)
