"""Tokenizer building (models/tokenizer.py), chat template (models/chat.py) and the ``tokenizer`` stage."""

from __future__ import annotations

import copy

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import tasks.registry as registry
from models.chat import ASSISTANT, BOS, CHAT_TOKENS, END, EOS, PAD, SPECIAL_TOKENS, USER, has_assistant_markers
from models.tokenizer import MIN_VOCAB_SIZE, bytes_per_token, encode_chat, load_tokenizer, save_tokenizer, train_tokenizer
from tasks.config import validate_config
from tasks.data import tokenize
from tasks.data import tokenizer as tokenizer_stage
from tasks.errors import ConfigError
from tasks.stage import Stage

WORDS = (
    "the model reads every token of the corpus and learns which byte pairs occur together most often "
    "so that frequent words become single tokens while rare words split into pieces"
).split()


def prose(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(prose(300), vocab_size=400)


def test_special_tokens_are_single_ids_at_the_front(trained):
    assert [trained.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for token in SPECIAL_TOKENS:
        ids = trained(f"model{token}token", add_special_tokens=False)["input_ids"]
        assert trained.convert_tokens_to_ids(token) in ids and trained.decode(ids) == f"model{token}token"
    assert (trained.bos_token, trained.eos_token, trained.pad_token) == (BOS, EOS, PAD)
    plain = trained("the model")["input_ids"]  # special tokens are never added implicitly
    assert trained.bos_token_id not in plain and trained.eos_token_id not in plain


def test_roundtrip_compression_and_autotokenizer_load(trained, tmp_path):
    from transformers import AutoTokenizer

    assert MIN_VOCAB_SIZE < len(trained) <= 400
    assert train_tokenizer(prose(300), vocab_size=400).backend_tokenizer.to_str() == trained.backend_tokenizer.to_str()
    files = save_tokenizer(trained, tmp_path)
    assert {f.name for f in files} == {"tokenizer.json", "tokenizer_config.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and has_assistant_markers(config["chat_template"])
    assert config["additional_special_tokens"] == list(CHAT_TOKENS)

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    unseen = ["Ünïcödé — 日本語 🎉\ttabs\r\n", "def f(x):\n    return x ** 2  # unseen code\n", "  leading and trailing  "]
    for text in unseen + prose(5, seed=1):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    assert loaded.eos_token_id == trained.eos_token_id and len(loaded) == len(trained)
    # Held-out prose in the training vocabulary compresses far better than raw bytes,
    # and a larger vocabulary compresses it further.
    heldout = prose(50, seed=2)
    small = train_tokenizer(prose(300), vocab_size=MIN_VOCAB_SIZE + 10)
    assert bytes_per_token(loaded, heldout) > 2.5 > bytes_per_token(small, heldout) > 1.0


def test_chat_template_renders_and_masks_only_the_assistant(trained):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the model reads"},
        {"role": "assistant", "content": " every token"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "it learns 🎉"},
    ]
    assert trained.apply_chat_template(messages, tokenize=False) == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nthe model reads<|end|>\n"
        "<|assistant|>\n every token<|end|>\n<|user|>\nand then?<|end|>\n<|assistant|>\nit learns 🎉<|end|>\n"
    )
    prompt = trained.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"{USER}\nthe model reads{END}\n{ASSISTANT}\n")

    ids, mask = encode_chat(trained, messages)
    assert len(ids) == len(mask) and ids[0] == trained.bos_token_id
    assert trained.decode([i for i, m in zip(ids, mask) if m]) == f" every token{END}it learns 🎉{END}"
    assert trained.decode([i for i, m in zip(ids, mask) if not m]).count(ASSISTANT) == 2
    with pytest.raises(Exception, match="unknown chat role"):
        trained.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_an_assistant_turn_of_weight_0_is_read_but_not_taught(trained):
    """The mask leaves out a ``"weight": 0`` turn, with the template's markers and without them."""
    messages = [
        {"role": "user", "content": "the model reads"},
        {"role": "assistant", "content": " a flawed reply", "weight": 0},
        {"role": "user", "content": "fix it"},
        {"role": "assistant", "content": "it learns 🎉"},
    ]
    unmarked = copy.deepcopy(trained)
    unmarked.chat_template = trained.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    for tokenizer in (trained, unmarked):
        ids, mask = encode_chat(tokenizer, messages)
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == f"it learns 🎉{END}"
        assert " a flawed reply" in tokenizer.decode(ids)
        full_ids, full_mask = encode_chat(tokenizer, [{k: v for k, v in m.items() if k != "weight"} for m in messages])
        assert full_ids == ids and sum(full_mask) > sum(mask)


def _foreign(tmp_path, chat_template: str | None = None):
    """A tokenizer from elsewhere: its own EOS, no BOS, no pad, maybe a template without masks."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(prose(50), trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", chat_template=chat_template).save_pretrained(str(tmp_path))
    return tmp_path


def test_load_tokenizer_completes_a_foreign_tokenizer(tmp_path):
    tokenizer, added = load_tokenizer(_foreign(tmp_path))
    assert added == [BOS, *CHAT_TOKENS]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "</s>" and tokenizer.bos_token == BOS
    ids, mask = encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the model"}])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == f"the model{END}"
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in CHAT_TOKENS)


def test_load_tokenizer_keeps_or_replaces_an_existing_template(tmp_path):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    kept, added = load_tokenizer(_foreign(tmp_path, plain))
    assert kept.chat_template == plain and added == []
    # No {% generation %} blocks: the assistant's span is what its turn adds to the rendering. This
    # template has no generation prompt either, so its role header counts as part of the turn.
    ids, mask = encode_chat(kept, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the model"}])
    assert [i for i, m in zip(ids, mask) if m] == kept("assistant: the model", add_special_tokens=False)["input_ids"]
    replaced, added = load_tokenizer(tmp_path, chat_template="crucible")
    assert added == [BOS, *CHAT_TOKENS]
    assert sum(encode_chat(replaced, [{"role": "assistant", "content": "the model"}])[1]) > 0


def test_config_train_or_adopt():
    assert tokenizer_stage.TokenizerConfig(path="/x").path == "/x"
    with pytest.raises(ValueError, match="only apply when training"):
        tokenizer_stage.TokenizerConfig(path="/x", vocab_size=1000)
    with pytest.raises(ValueError, match="only applies with `path`"):
        tokenizer_stage.TokenizerConfig(chat_template="crucible")
    with pytest.raises(ValueError):
        tokenizer_stage.TokenizerConfig(vocab_size=100)


# ---------------------------------------------------------------------------------- stage


@pytest.fixture
def tokenizer_after_ingest(monkeypatch):
    """``tokenizer`` and ``tokenize`` straight after ``ingest``: the stages tested without filter/dedup/pii."""
    real = tokenizer_stage.STAGE
    monkeypatch.setitem(registry.STAGES, "tokenizer", Stage("tokenizer", ("ingest",), real.version, real.run, real.inputs))
    monkeypatch.setitem(registry.STAGES, "tokenize", Stage("tokenize", ("ingest", "tokenizer"), tokenize.STAGE.version, tokenize.STAGE.run))


def _config(tmp_path, sources: dict[str, list[str]], tokens: dict | None = None, **section):
    spec = []
    for name, texts in sources.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        spec.append({"name": name, "path": str(path), "domain": name, "id_field": "id"})
    config = {"name": "tok", "store": str(tmp_path / "store"), "ingest": {"sources": spec}, "tokenizer": section}
    return validate_config(config | ({"tokenize": tokens} if tokens is not None else {}), "test")


def test_sample_is_deterministic_and_independent_of_sharding(tmp_path, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"web/{i}" for i in range(400)]
    table = pa.table({"id": ids, "text": [f"text of {i}" for i in ids]})
    one = tmp_path / "one.parquet"
    pq.write_table(table, one)
    many = [tmp_path / f"part{k}.parquet" for k in range(3)]
    for k, path in enumerate(many):
        pq.write_table(table.slice(k * 150, 150), path)

    sample = tokenizer_stage.sample_texts([str(one)], 50, seed=7, rows=400)
    assert len(sample) == 50 and len(set(sample)) == 50
    assert tokenizer_stage.sample_texts([str(p) for p in many], 50, seed=7, rows=400) == sample
    # Exactly the 50 smallest hashes, in hash order: the same as hashing every id here.
    keys = tokenizer_stage.id_hashes(ids, f"{tokenizer_stage.SAMPLE_SALT}:7")
    assert sample == [f"text of {ids[i]}" for i in sorted(range(400), key=lambda i: keys[i])[:50]]


def test_stage_trains_saves_measures_and_feeds_tokenize(tmp_path, tmp_home, ray_session, tokenizer_after_ingest):
    from transformers import AutoTokenizer

    from tasks.engine import run_pipeline

    code = [f"def f{i}(x):\n    return x + {i}\n" for i in range(50)]
    tokens = {"seq_len": 32, "mix": {"web": 0.5, "code": 0.5}, "val_fraction": 0.1}
    config = _config(tmp_path, {"web": prose(150), "code": code}, tokens, vocab_size=500, sample_docs=120, heldout_fraction=0.25)
    outcomes = run_pipeline(config)
    manifest, packed = outcomes[1].manifest, outcomes[2].manifest
    assert manifest.stage == "tokenizer"
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(manifest.files)
    assert manifest.counts["sample_docs"] == 120 and manifest.counts["heldout_docs"] == 30
    assert manifest.counts["train_docs"] == 90
    loaded = AutoTokenizer.from_pretrained(tokenizer_stage.tokenizer_uri(manifest))
    assert len(loaded) == manifest.counts["vocab_size"] <= 500
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith(BOS + USER)
    assert manifest.metrics["heldout_bytes_per_token"] > 2.0

    index = tokenize.read_token_index(packed)
    assert index.tokenizer == tokenizer_stage.tokenizer_uri(manifest) and index.vocab_size == len(loaded)
    assert {"index.json", "train/00000.npy", "val/00000.npy"} <= set(packed.files)
    assert packed.tokens == packed.rows * 32 == (index.splits["train"].sequences + index.splits["val"].sequences) * 32
    assert packed.counts["tokens.train"] == index.splits["train"].tokens
    assert abs(index.mix.domain["code"].achieved - 0.5) < 0.1
    train = tokenize.load_token_shards(packed, "train")
    assert train[0].shape == (32,) and loaded.eos_token_id in train[:].ravel()


def test_stage_adopts_an_existing_tokenizer(tmp_path, tmp_home, ray_session, tokenizer_after_ingest):
    from tasks.engine import plan, run_pipeline

    foreign = _foreign(tmp_path / "foreign")
    config = _config(tmp_path, {"web": prose(20)}, path=str(foreign), sample_docs=10)
    before = plan(config)["tokenizer"].fingerprint
    manifest = run_pipeline(config)[-1].manifest
    adopted, added = load_tokenizer(tokenizer_stage.tokenizer_uri(manifest))
    assert added == [] and adopted.eos_token == "</s>" and adopted.bos_token == BOS
    assert manifest.counts["added_tokens"] == len(CHAT_TOKENS) + 1 and manifest.counts["heldout_docs"] == 10
    (foreign / "tokenizer.json").write_text((foreign / "tokenizer.json").read_text() + "\n")
    assert plan(config)["tokenizer"].fingerprint != before  # the adopted files are part of the fingerprint
    (foreign / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        plan(config)
