"""The ``tokenize`` stage: packing rule, mixing, validation split, shard format and reader."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.tokenizer import save_tokenizer, train_tokenizer
from tasks.config import PipelineConfig
from tasks.data import tokenize
from tasks.data.tokenizer import id_uniform
from tasks.errors import StageError
from tasks.stage import Manifest, StageContext
from tasks.store import StageDir
from tasks.trace import copy_location
from tasks.tracking import RunLogger

EOS = 1


# ---------------------------------------------------------------------------------- packing


def _docs_table(docs: list[list[int]], cells: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "domain": [c[0] for c in cells],
            "lang": [c[1] for c in cells],
            "tokens": pa.array(docs, type=pa.large_list(pa.uint32())),
        }
    )


def test_packer_follows_the_packing_rule():
    """Docs + one EOS each, concatenated, cut into seq_len rows; only the final remainder is lost."""
    rng = random.Random(0)
    seq_len = 16
    docs = [[rng.randint(10, 99) for _ in range(rng.choice([0, 1, 5, 15, 16, 17, 40]))] for _ in range(300)]
    cells = [(rng.choice(["web", "code"]), "") for _ in docs]
    stream = [t for doc in docs for t in [*doc, EOS]]
    labels = [c for doc, c in zip(docs, cells) for _ in range(len(doc) + 1)]

    table = _docs_table(docs, cells)
    packer, rows, start = tokenize.SequencePacker(seq_len), [], 0
    while start < len(docs):  # uneven batches, each a slice of the table (non-zero list offsets)
        size = rng.randint(1, 40)
        rows.append(packer.add(*tokenize.document_stream(table.slice(start, size), EOS)))
        start += size
    packed = np.concatenate(rows)

    cut = len(stream) // seq_len * seq_len
    assert packed.shape == (cut // seq_len, seq_len)
    assert packed.ravel().tolist() == stream[:cut]
    assert packer.dropped == len(stream) - cut < seq_len
    assert packer.documents == len(docs)
    assert packer.tokens == Counter(labels[:cut])


# ---------------------------------------------------------------------------------- mixing


def _shares_of(rates: dict, available: dict, axis: int) -> dict[str, float]:
    drawn: Counter[str] = Counter()
    for cell, rate in rates.items():
        drawn[cell[axis]] += rate * available[cell]
    total = sum(drawn.values())
    return {k: v / total for k, v in drawn.items()}


def test_plan_mix_meets_domain_and_language_targets():
    available = {("web", "en"): 9000, ("web", "fr"): 1000, ("code", "en"): 500, ("code", "fr"): 500, ("news", "en"): 3000}
    rates, budget = tokenize.plan_mix(available, {"web": 1, "code": 1}, None, None)
    assert budget == 11_000 and ("news", "en") not in rates  # unlisted domains are dropped
    assert _shares_of(rates, available, 0) == pytest.approx({"web": 0.5, "code": 0.5})
    assert rates[("web", "en")] == pytest.approx(rates[("web", "fr")])  # within a domain, proportions are kept

    rates, budget = tokenize.plan_mix(available, {"web": 0.6, "code": 0.2, "news": 0.2}, {"en": 0.7, "fr": 0.3}, 20_000)
    assert budget == 20_000 and sum(r * available[c] for c, r in rates.items()) == pytest.approx(20_000)
    assert _shares_of(rates, available, 0) == pytest.approx({"web": 0.6, "code": 0.2, "news": 0.2}, abs=1e-5)
    assert _shares_of(rates, available, 1) == pytest.approx({"en": 0.7, "fr": 0.3}, abs=1e-5)

    rates, _ = tokenize.plan_mix(available, None, None, 27_000)
    assert list(rates.values()) == pytest.approx([27_000 / 14_000] * len(available))


def test_plan_mix_refuses_what_it_cannot_meet():
    available = {("web", "en"): 100, ("code", "fr"): 100}
    with pytest.raises(StageError, match="domain.*math"):
        tokenize.plan_mix(available, {"web": 1, "math": 1}, None, None)
    with pytest.raises(StageError, match="cannot both be met"):  # web is all English, code all French
        tokenize.plan_mix(available, {"web": 0.5, "code": 0.5}, {"en": 0.9, "fr": 0.1}, None)


def test_select_copies_is_deterministic_and_unbiased():
    n = 4000
    batch = pa.table(
        {
            "id": [f"d{i}" for i in range(n)],
            "domain": ["up"] * (n // 2) + ["down"] * (n // 2),
            "lang": [""] * n,
            "val": [i % 10 == 0 for i in range(n)],
        }
    )
    rates = {("up", ""): 2.4, ("down", ""): 0.3}
    out = tokenize.select_copies(batch, rates, seed=3)
    assert out.equals(tokenize.select_copies(batch, rates, seed=3))
    copies = Counter(out.column("id").to_pylist())
    val = {f"d{i}" for i in range(0, n, 10)}
    assert all(copies[i] == 1 for i in val)  # validation documents are never resampled
    up = [copies[f"d{i}"] for i in range(n // 2) if f"d{i}" not in val]
    down = [copies[f"d{i}"] for i in range(n // 2, n) if f"d{i}" not in val]
    assert set(up) == {2, 3} and np.mean(up) == pytest.approx(2.4, abs=0.05)
    assert set(down) == {0, 1} and np.mean(down) == pytest.approx(0.3, abs=0.05)
    first = {}
    for doc, copy in zip(out.column("id").to_pylist(), out.column("copy").to_pylist()):
        first.setdefault(doc, []).append(copy)
    assert all(c == list(range(len(c))) for c in first.values())
    assert len(set(out.column("key").to_pylist())) == len(out)
    assert not out.equals(tokenize.select_copies(batch, rates, seed=4))


def test_rejected_documents_are_exactly_those_without_a_copy_and_say_why():
    n = 3000
    cells = [("web", "en"), ("web", "fr"), ("news", "en"), ("web", "de"), ("code", "en")]
    batch = pa.table(
        {
            "id": [f"d{i}" for i in range(n)],
            "source": [f"s{i % 7}" for i in range(n)],
            "domain": [cells[i % len(cells)][0] for i in range(n)],
            "lang": [cells[i % len(cells)][1] for i in range(n)],
            "val": [i % 9 == 0 for i in range(n)],
        }
    )
    # web/en subsampled, web/fr repeated; code/en is mixed in but has no rate (no training tokens)
    rates = {("web", "en"): 0.4, ("web", "fr"): 1.5}
    kept = set(tokenize.select_copies(batch, rates, seed=2).column("id").to_pylist())
    rejected = tokenize.rejected_documents(batch, rates, 2, ["code", "web"], ["en", "fr"])
    assert rejected.schema == tokenize.REJECTED_SCHEMA
    gone = rejected.column("id").to_pylist()
    assert set(gone).isdisjoint(kept) and set(gone) | kept == set(batch.column("id").to_pylist())
    by_cell = {}
    for row in rejected.to_pylist():
        by_cell.setdefault((row["domain"], row["lang"]), set()).add((row["reason"], row["split"]))
        assert row["source"] == f"s{int(row['id'][1:]) % 7}"
    assert by_cell[("news", "en")] == {("domain_not_in_mix", "train"), ("domain_not_in_mix", "val")}
    assert by_cell[("web", "de")] == {("lang_not_in_mix", "train"), ("lang_not_in_mix", "val")}
    assert by_cell[("web", "en")] == {("mix_subsampled", "train")}  # validation documents are never subsampled
    assert by_cell[("code", "en")] == {("no_training_documents", "train"), ("no_training_documents", "val")}
    assert ("web", "fr") not in by_cell
    assert tokenize.rejected_documents(batch.slice(1, 1), rates, 2, None, None).num_rows == 0  # web/fr: kept


# ---------------------------------------------------------------------------------- format


def test_shards_and_reader(tmp_path):
    out = StageDir.at(str(tmp_path), "tokenize", "fp")
    writer = tokenize.ShardWriter(out, "train", 3, "uint16")
    rows = np.arange(8 * 4, dtype=np.uint32).reshape(8, 4)
    writer.add(rows[:5])
    writer.add(rows[5:])
    shards = writer.close()
    assert [(s.file, s.sequences) for s in shards] == [("train/00000.npy", 3), ("train/00001.npy", 3), ("train/00002.npy", 2)]
    split = tokenize.SplitIndex(shards=shards, sequences=8, tokens=32)
    index = tokenize.TokenIndex(
        seq_len=4, dtype="uint16", vocab_size=300, eos_token_id=1, bos_token_id=0, pad_token_id=2, tokenizer="x",
        splits={"train": split, "val": tokenize.SplitIndex()}, mix=tokenize.MixReport(budget=32, domain={}),
    )
    out.write_bytes_atomic(tokenize.INDEX, index.model_dump_json().encode())

    assert np.load(out.path("train/00001.npy")).dtype == np.uint16
    shards = tokenize.load_token_shards(out.root, "train")
    assert len(shards) == 8 and shards.seq_len == 4
    assert shards[4].tolist() == rows[4].tolist() and shards[-1].tolist() == rows[7].tolist()
    assert shards[2:7].tolist() == rows[2:7].tolist() and shards[[7, 0, 3]].tolist() == rows[[7, 0, 3]].tolist()
    with pytest.raises(IndexError):
        shards[8]
    revived = pickle.loads(pickle.dumps(shards))
    assert revived._arrays is None and revived[5].tolist() == rows[5].tolist()
    assert len(tokenize.load_token_shards(out.root, "val")) == 0
    # 32 distinct tokens, each once: the unigram entropy is ln 32, summed across the three shards
    assert shards.unigram_entropy(300) == pytest.approx(np.log(32))


# ---------------------------------------------------------------------------------- stage

WORDS = {
    "en": "the of and to in is that for it as with was on be by this are from at an".split(),
    "fr": "le la les de des et un une est dans pour que qui sur pas plus avec par".split(),
}
LENGTHS = {"web": (20, 40), "code": (4, 8), "news": (10, 20)}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _manifest(stage: str, path, files: list[str], rows: int | None = None) -> Manifest:
    return Manifest(
        stage=stage, fingerprint=stage, upstream={}, path=str(path), files=files, rows=rows,
        code_version="1", crucible_version="test", started_at=_now(), finished_at=_now(),
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """2500 documents in 3 domains and 2 languages (a third French), of unequal lengths by domain."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    rows = []
    for domain, count in (("web", 1200), ("code", 800), ("news", 500)):
        for i in range(count):
            lang = "fr" if i % 3 == 0 else "en"
            body = " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(*LENGTHS[domain])))
            rows.append({"id": f"{domain}/{i}", "text": f"{domain} {i}: {body}", "source": f"src-{domain}", "domain": domain, "lang": lang})
    table = pa.Table.from_pylist(rows)
    (root / "docs" / "documents").mkdir(parents=True)
    pq.write_table(table.slice(0, 1300), root / "docs" / "documents" / "a.parquet")
    pq.write_table(table.slice(1300), root / "docs" / "documents" / "b.parquet")
    documents = _manifest("pii", root / "docs", ["documents/a.parquet", "documents/b.parquet"], len(rows))

    tokenizer = train_tokenizer([r["text"] for r in rows], vocab_size=400)
    save_tokenizer(tokenizer, root / "tok" / "tokenizer")
    tok = _manifest("tokenizer", root / "tok", ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"])
    return {"rows": {r["id"]: r for r in rows}, "documents": documents, "tokenizer": tok, "tok": tokenizer, "root": root}


def _run(corpus, name: str, **section):
    out = StageDir.at(str(corpus["root"] / "store"), "tokenize", name)
    out.make()
    ctx = StageContext(
        name="tokenize", config=tokenize.TokenizeConfig(**section), pipeline=PipelineConfig(name="test"),
        upstream={"pii": corpus["documents"], "tokenizer": corpus["tokenizer"]}, out=out, log=RunLogger(None, "unused"),
    )
    return tokenize.run(ctx), out


def _documents_in(corpus, shards: tokenize.TokenShards) -> list[str]:
    """Ids of the documents whose every token and EOS are in the packed split, in stream order."""
    flat = shards[:].ravel().tolist() if len(shards) else []
    by_text = {r["text"]: doc_id for doc_id, r in corpus["rows"].items()}
    found, start = [], 0
    for end in [i for i, t in enumerate(flat) if t == corpus["tok"].eos_token_id]:
        text = corpus["tok"].decode(flat[start:end])
        assert text in by_text, f"a packed segment is not a document: {text[:80]!r}"
        found.append(by_text[text])
        start = end + 1
    return found


def test_stage_mixes_packs_and_splits(corpus, ray_session):
    mix, lang_mix = {"web": 0.3, "code": 0.5, "news": 0.2}, {"en": 0.6, "fr": 0.4}
    result, out = _run(corpus, "mixed", seq_len=64, mix=mix, lang_mix=lang_mix, val_fraction=0.1, sequences_per_shard=50, num_workers=2)
    index = tokenize.read_token_index(out.root)
    train, val = index.splits["train"], index.splits["val"]
    assert (index.seq_len, index.dtype, index.vocab_size) == (64, "uint16", len(corpus["tok"]))
    assert result.rows == train.sequences + val.sequences and result.tokens == (train.sequences + val.sequences) * 64
    assert [s.sequences for s in train.shards][:-1] == [50] * (len(train.shards) - 1)
    for split in (train, val):
        assert split.tokens == split.sequences * 64 == sum(split.tokens_by_domain.values()) == sum(split.tokens_by_lang.values())
        assert 0 <= split.dropped_tokens < 64

    # Mixing: the packed training tokens follow the targets, and the index reports them honestly.
    for axis, targets in (("domain", mix), ("lang", lang_mix)):
        achieved = getattr(index.mix, axis)
        for key, target in targets.items():
            assert achieved[key].target == pytest.approx(target)
            assert achieved[key].achieved == pytest.approx(target, abs=0.03), (axis, key)
    assert result.metrics["share.domain.code.achieved"] == index.mix.domain["code"].achieved

    # Packing: every EOS-delimited segment is a whole document; code (upsampled) repeats.
    train_docs = _documents_in(corpus, tokenize.load_token_shards(out.root, "train"))
    val_docs = _documents_in(corpus, tokenize.load_token_shards(out.root, "val"))
    assert max(Counter(d for d in train_docs if d.startswith("code/")).values()) >= 2
    assert len(train_docs) <= train.documents <= len(train_docs) + 1 + train.dropped_tokens

    # ids/ (what crucible trace reads): every copy packed, where its tokens lie, found in the shards.
    rows = pq.read_table(out.path("ids")).to_pylist()
    spans = [r for r in rows if r["reason"] is None]
    left_out = pq.read_table(out.path(tokenize.REJECTED)).select(["id", "split", "reason"]).to_pylist()
    assert sorted((r["id"], r["split"], r["reason"]) for r in rows if r["reason"]) == sorted(tuple(r.values()) for r in left_out)
    assert Counter(r["split"] for r in spans) == {"train": train.documents, "val": val.documents}
    whole = Counter(r["id"] for r in spans if r["split"] == "train" and r["start"] + r["length"] <= train.tokens)
    assert whole == Counter(train_docs)
    shards = set()
    for r in spans[:: max(1, len(spans) // 100)] + [r for r in spans if r["copy"] > 0][:20]:  # and repeats
        where = copy_location(r["copy"], r["start"], r["length"], 64, index.splits[r["split"]])
        tokens = [t for p in where.pieces for t in np.load(out.path(p.shard))[p.row][p.offset : p.offset + p.tokens].tolist()]
        expected = corpus["tok"](corpus["rows"][r["id"]]["text"])["input_ids"] + [corpus["tok"].eos_token_id]
        assert tokens == expected[: len(tokens)] and len(tokens) + where.dropped == len(expected) == r["length"]
        shards |= {p.shard for p in where.pieces}
    assert len(shards) > 2  # the validation shard and several training shards

    # Validation: chosen by id hash, disjoint by document, never repeated, nothing else lost.
    ids = list(corpus["rows"])
    expected_val = {i for i, u in zip(ids, id_uniform(ids, tokenize.VAL_SALT)) if u < 0.1}
    assert set(val_docs) <= expected_val and not set(train_docs) & expected_val
    assert len(val_docs) == len(set(val_docs)) and val.documents == len(expected_val)
    tokens_of = {i: len(corpus["tok"](corpus["rows"][i]["text"])["input_ids"]) + 1 for i in expected_val}
    assert val.tokens + val.dropped_tokens == sum(tokens_of.values())

    # Deterministic: one tokenizer actor instead of two gives the same bytes.
    _, again = _run(corpus, "one-worker", seq_len=64, mix=mix, lang_mix=lang_mix, val_fraction=0.1, sequences_per_shard=50, num_workers=1)
    for shard in train.shards + val.shards:
        assert again.fs.open_input_stream(again.path(shard.file)).read() == out.fs.open_input_stream(out.path(shard.file)).read()


def test_stage_drops_unlisted_domains_and_keeps_the_validation_set(corpus, ray_session):
    _, out = _run(corpus, "no-news", seq_len=32, mix={"web": 1, "code": 1}, val_fraction=0.1, seed=5)
    index = tokenize.read_token_index(out.root)
    assert set(index.splits["train"].tokens_by_domain) == {"web", "code"} and index.mix.domain["news"].target == 0
    assert index.mix.domain["news"].available > 0 and index.mix.lang is None
    train_docs = _documents_in(corpus, tokenize.load_token_shards(out.root, "train"))
    val_docs = _documents_in(corpus, tokenize.load_token_shards(out.root, "val"))
    assert not any(d.startswith("news/") for d in train_docs + val_docs)
    ids = [i for i in corpus["rows"] if not i.startswith("news/")]
    expected_val = {i for i, u in zip(ids, id_uniform(ids, tokenize.VAL_SALT)) if u < 0.1}
    assert set(val_docs) <= expected_val and index.splits["val"].documents == len(expected_val)

    with pytest.raises(StageError, match="lang_mix needs a `lang` column"):
        no_lang = corpus["root"] / "nolang"
        (no_lang / "documents").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ["a"], "text": ["x"], "domain": ["web"]}), no_lang / "documents" / "a.parquet")
        docs = _manifest("pii", no_lang, ["documents/a.parquet"], 1)
        _run({**corpus, "documents": docs}, "no-lang", lang_mix={"en": 1})


def test_stage_keeps_what_it_drops_in_rejected(corpus, ray_session):
    """news is not in the mix, web and code are subsampled to the budget: every document left out is a
    row of rejected/ with its reason, and the manifest counts agree."""
    result, out = _run(corpus, "rejected", seq_len=32, mix={"web": 1, "code": 1}, total_tokens=3000, val_fraction=0.1, seed=1)
    rejected = pq.read_table(out.path(tokenize.REJECTED))
    assert rejected.schema.equals(tokenize.REJECTED_SCHEMA)
    rows = rejected.to_pylist()
    reasons = Counter(r["reason"] for r in rows)
    assert set(reasons) == {"domain_not_in_mix", "mix_subsampled"}
    assert {r["id"] for r in rows if r["reason"] == "domain_not_in_mix"} == {i for i in corpus["rows"] if i.startswith("news/")}
    subsampled = [r for r in rows if r["reason"] == "mix_subsampled"]
    assert subsampled and all(r["split"] == "train" and r["domain"] in ("web", "code") for r in subsampled)
    assert all(r["source"] == corpus["rows"][r["id"]]["source"] and r["domain"] == corpus["rows"][r["id"]]["domain"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)

    assert result.counts["rejected"] == len(rows)
    assert {k: v for k, v in result.counts.items() if k.startswith("rejected.")} == {f"rejected.{k}": v for k, v in reasons.items()}
    index = tokenize.read_token_index(out.root)
    # every rate is below 1 here: each document is packed once, or rejected once
    assert index.splits["train"].documents + index.splits["val"].documents + len(rows) == len(corpus["rows"])
    packed = _documents_in(corpus, tokenize.load_token_shards(out.root, "train"))
    assert not set(packed) & {r["id"] for r in rows}
    assert "rejected/" in result.report
