"""EleutherAI's lm-eval-harness runs on a Crucible checkpoint offline, and agrees with our scorer.

A tiny model saved here, two local tasks (multiple choice and rolling log-likelihood) on local
JSONL files, the ``lm-eval`` CLI with the hub and datasets offline: the harness's ``acc`` /
``acc_norm`` / ``bits_per_byte`` must equal ``multiple_choice`` / ``perplexity`` suites' numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from models.presets import build_model
from models.tokenizer import save_tokenizer, train_tokenizer
from tasks.eval.choice import ChoiceSuite
from tasks.eval.lm import LanguageModel, ModelSpec
from tasks.eval.perplexity import PerplexitySuite
from tasks.eval.suite import EvalSettings

LM_EVAL = shutil.which("lm-eval") or str(Path(os.sys.executable).with_name("lm-eval"))
pytestmark = pytest.mark.skipif(not Path(LM_EVAL).exists(), reason="lm-eval is not installed")

TEXTS = [
    "The river runs past the old mill.",
    "def add(a, b):\n    return a + b\n",
    "Every morning the baker sells warm bread to the town, and the children buy rolls on the way to school.",
]
QUESTIONS = [
    {"question": "The river runs past the old", "choices": ["mill", "spaceship", "volcano"], "answer": 0},
    {"question": "Every morning the baker sells warm", "choices": ["bread", "snow"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "nothing at all, ever"], "answer": 0},
    {"question": "The children buy", "choices": ["rolls", "rockets on the moon"], "answer": 1},
]
MC_TASK = """task: crucible_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
TEXT_TASK = """task: crucible_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def test_lm_eval_runs_offline_and_matches_our_scores(tmp_path):
    tokenizer = train_tokenizer(TEXTS * 20, vocab_size=300)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    build_model("tiny", len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tasks / "crucible_mc.yaml").write_text(MC_TASK.format(path=tmp_path / "mc.jsonl"))
    (tasks / "crucible_text.yaml").write_text(TEXT_TASK.format(path=tmp_path / "text.jsonl"))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    command = [
        LM_EVAL, "run", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32,prefix_token_id={tokenizer.eos_token_id}",
        "--include_path", str(tasks), "--tasks", "crucible_mc,crucible_text",
        "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [results_file] = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]

    lm = LanguageModel(ModelSpec("tiny", str(model_dir), chat=False), device="cpu", batch_size=2)
    mc_suite = ChoiceSuite(name="mc", path=str(tmp_path / "mc.jsonl"))
    mc = mc_suite.evaluate(lm, mc_suite.read_rows(), EvalSettings())
    text_suite = PerplexitySuite(name="text", path=str(tmp_path / "text.jsonl"))
    text = text_suite.evaluate(lm, text_suite.read_rows(), EvalSettings())
    [samples_file] = list((tmp_path / "out").rglob("samples_crucible_mc_*.jsonl"))
    theirs = {s["doc_id"]: [float(ll) for ll, _ in s["filtered_resps"]] for s in map(json.loads, samples_file.read_text().splitlines())}
    for doc_id, ours in enumerate(mc.samples):  # every choice's log-likelihood, not just the verdicts
        assert ours["logprobs"] == pytest.approx(theirs[doc_id], abs=1e-3)
    assert results["crucible_mc"]["acc,none"] == pytest.approx(mc.metrics["acc"])
    assert results["crucible_mc"]["acc_norm,none"] == pytest.approx(mc.metrics["acc_char"])
    assert results["crucible_text"]["bits_per_byte,none"] == pytest.approx(text.metrics["bpb"], rel=1e-4)
