"""The ``dedup`` stage: normalization, shingles, MinHash, clustering, and whole runs on Ray."""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tasks.data.clusters import spanning_forest, union_find
from tasks.data.dedup import (
    STAGE,
    DedupConfig,
    band_rows,
    bucket_pairs,
    duplicates_table,
    near_duplicates,
    route_documents,
    run,
    score_pairs,
    signature_batch,
    unique_pairs,
)
from tasks.data.minhash import (
    MinHasher,
    candidate_probability,
    estimated_similarity,
    jaccard,
    normalized_words,
    shingle_hashes,
    text_hashes,
)
from tasks.stage import Manifest, StageContext
from tasks.store import StageDir
from tasks.tracking import RunLogger

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "to", "sa", "vi", "de", "po", "la", "re", "chi", "ba", "go", "fu"]


def vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    words = {"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(size * 2)}
    return sorted(words)[:size]


def edit(words: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` random word substitutions by words that appear nowhere else."""
    out = list(words)
    for k, i in enumerate(rng.sample(range(len(out)), n)):
        out[i] = f"edit{rng.randrange(10**9)}x{k}"
    return out


def naive_jaccard(x: str, y: str, n: int = 5) -> float:
    """Word n-gram Jaccard written the obvious way (ASCII text)."""

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.sub(r"[^\w\s]", " ", text.lower()).split()
        return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}

    a, b = grams(x), grams(y)
    return len(a & b) / len(a | b)


# ------------------------------------------------------------------------------- pure parts


def test_normalization_ignores_case_punctuation_and_whitespace():
    texts = pa.array(["Hello,  World! It's\tfine.", "hello world it s fine", "  HELLO WORLD — it’s fine!!  ", "hello world"])
    words = normalized_words(texts)
    assert words.to_pylist()[0] == ["hello", "world", "it", "s", "fine"]
    high, low = text_hashes(words)
    assert len({(h, lo) for h, lo in zip(high[:3], low[:3])}) == 1
    assert (high[3], low[3]) != (high[0], low[0])
    assert normalized_words(pa.array(["", "!!! ...", " a "])).to_pylist() == [[], [], ["a"]]


def test_shingle_jaccard_equals_naive_word_ngram_jaccard():
    rng = random.Random(1)
    vocab = vocabulary(rng)
    base = [rng.choice(vocab) for _ in range(120)]
    texts = [" ".join(base)] + [" ".join(edit(base, n, rng)) for n in (1, 3, 8, 20)]
    texts += ["ka lo mi", "ka lo mi", "ka lo", ". Ka, LO mi!"]  # shorter than one 5-gram
    values, offsets = shingle_hashes(normalized_words(pa.array(texts)), 5)
    assert list(np.diff(offsets)) == [116] * 5 + [1, 1, 1, 1]
    sets = [values[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            assert jaccard(sets[i], sets[j]) == pytest.approx(naive_jaccard(texts[i], texts[j])), (i, j)


def test_minhash_estimates_jaccard_and_bands_follow_the_s_curve():
    rng = random.Random(2)
    vocab = vocabulary(rng)
    hasher = MinHasher(ngram=5, num_perm=100, seed=7)
    exact, estimate, shared = [], [], []
    for trial in range(60):
        base = [rng.choice(vocab) for _ in range(300)]
        variant = edit(base, rng.randint(1, 40), rng)
        values, offsets = shingle_hashes(normalized_words(pa.array([" ".join(base), " ".join(variant)])), 5)
        signatures = hasher.signatures(values, offsets)
        keys = hasher.band_keys(signatures, 20, 5)
        exact.append(jaccard(values[: offsets[1]], values[offsets[1] :]))
        estimate.append(estimated_similarity(signatures[0], signatures[1]))
        shared.append((keys[0] == keys[1]).any())
    exact, estimate, shared = np.array(exact), np.array(estimate), np.array(shared)
    assert np.abs(exact - estimate).mean() < 0.04  # MinHash with 100 permutations: se <= 0.05
    assert shared[exact >= 0.8].all()  # P(candidate | 0.8) = 0.9997
    assert not shared[exact < 0.2].any()
    assert candidate_probability(0.8, 20, 5) > 0.999 > candidate_probability(0.3, 20, 5) + 0.9


def test_union_find_and_forest_match_naive_components():
    rng = np.random.default_rng(3)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    labels = union_find(n, a, b)
    naive = list(range(n))  # relabel to the smallest node until stable

    def find(x: int) -> int:
        while naive[x] != x:
            x = naive[x]
        return x

    for x, y in zip(a, b):
        rx, ry = find(x), find(y)
        naive[max(rx, ry)] = min(rx, ry)
    assert [find(x) for x in range(n)] == labels.tolist()

    forest = spanning_forest(n, a, b, np.arange(len(a), dtype=float))
    edges = {(int(x), int(y)) for x, y in zip(a, b)} | {(int(y), int(x)) for x, y in zip(a, b)}
    for node in range(n):
        if forest.root[node] == node:
            assert forest.parent[node] == -1 and np.isnan(forest.weight[node])
            continue
        assert (node, forest.parent[node]) in edges  # linked to a real neighbour ...
        walk = node
        for _ in range(n):  # ... and the links lead to the survivor
            walk = forest.parent[walk] if forest.parent[walk] >= 0 else walk
        assert walk == forest.root[node] == labels[node]


def test_config_checks_and_registration():
    from tasks.config import validate_config
    from tasks.errors import ConfigError
    from tasks.registry import STAGES

    with pytest.raises(ValueError, match="exceeds num_perm"):
        DedupConfig(bands=30, rows=5)
    with pytest.raises(ValueError, match="at least one"):
        DedupConfig(exact=False, fuzzy=False)
    assert STAGES["dedup"] is STAGE and STAGE.upstream == ("filter",)
    with pytest.raises(ConfigError, match="filter"):
        validate_config({"name": "x", "ingest": {"sources": [{"name": "w", "path": "x", "domain": "web"}]}, "dedup": {}}, "t")


def signature_table(texts: list[str], ids: list[str] | None = None, cfg: DedupConfig = DedupConfig()) -> pa.Table:
    batch = pa.table({"id": ids or [f"d{i}" for i in range(len(texts))], "text": texts})
    return signature_batch(batch, cfg.hasher, cfg.bands, cfg.rows, partitions=3)


def test_band_rows_and_bucket_pairs():
    rng = random.Random(6)
    vocab = vocabulary(rng)
    base = [rng.choice(vocab) for _ in range(100)]
    texts = [" ".join(base)] * 4 + [" ".join(base) + " extra words here", "!!!"]  # 4 same + 1 longer + empty
    ids = ["d3", "d1", "d2", "d0", "long", "empty"]
    rows = band_rows(signature_table(texts, ids), partitions=3)
    assert len(rows) == 5 * 20 and "empty" not in rows.column("id").to_pylist()  # no shingles, no bands
    assert set(rows.column("part").to_pylist()) <= {0, 1, 2}

    pairs = bucket_pairs(rows, max_bucket_size=64)
    unique = {(a, b) for a, b in zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist())}
    assert ("d0", "d1") in unique and ("d1", "d0") not in unique  # best first: longest, then smallest id
    assert all(b != "long" for _, b in unique)  # nothing ranks above the longest
    star = bucket_pairs(rows, max_bucket_size=2)
    assert {a for a in star.column("a").to_pylist()} <= {"long", "d0"}  # buckets of 5 -> star pairs only
    assert set(pairs.column("method").to_pylist()) == {"minhash"}

    exact = pa.table({"part": [0], "key": pa.array([None], pa.uint64()), "id": ["x"], "length": [3], "exact_of": ["y"]})
    passed = bucket_pairs(exact, 64)
    assert passed.to_pylist() == [{"a": "y", "b": "x", "a_length": None, "b_length": 3, "bucket": None, "method": "exact"}]


def test_unique_pairs_merges_repeats_across_bands_and_chunks():
    def chunk(pairs: list[tuple[str, str, int]]) -> pa.Table:
        return pa.table({"a": [p[0] for p in pairs], "b": [p[1] for p in pairs], "a_length": [9] * len(pairs),
                         "b_length": [5] * len(pairs), "bucket": [p[2] for p in pairs], "method": ["minhash"] * len(pairs)})

    merged = unique_pairs([chunk([("a", "b", 2), ("a", "c", 2)]), chunk([("a", "b", 70)]), chunk([("a", "b", 2)])], compact_rows=1)
    assert merged.select(["a", "b", "bands", "bucket"]).to_pylist() == [
        {"a": "a", "b": "b", "bands": 3, "bucket": 70}, {"a": "a", "b": "c", "bands": 1, "bucket": 2},
    ]


@pytest.mark.parametrize("verify", [True, False])
def test_route_and_score_pairs(verify):
    rng = random.Random(7)
    vocab = vocabulary(rng)
    base = [rng.choice(vocab) for _ in range(200)]
    texts = {"p": " ".join(base), "q": " ".join(edit(base, 4, rng)), "r": " ".join(base).upper(), "s": "unrelated words"}
    batch = pa.table({"id": list(texts), "text": list(texts.values())})
    owners = pa.table({"id": ["p", "q", "r", "q"], "part": [0, 0, 0, 1]})
    routed = route_documents(batch, owners, MinHasher(), verify)
    assert sorted(zip(routed.column("part").to_pylist(), routed.column("id").to_pylist())) == [(0, "p"), (0, "q"), (0, "r"), (1, "q")]
    pairs = {0: pa.table({"a": ["p", "p"], "b": ["q", "r"]})}
    scored = score_pairs(routed.filter(pc.equal(routed["part"], 0)), pairs, ngram=5)
    similarity = dict(zip(scored.column("b").to_pylist(), scored.column("similarity").to_pylist()))
    assert similarity["r"] == 1.0
    expected = naive_jaccard(texts["p"], texts["q"])
    assert similarity["q"] == (pytest.approx(expected) if verify else pytest.approx(expected, abs=0.15))


def test_exact_twin_removed_as_near_duplicate_points_to_the_near_survivor():
    exact = pa.table({"id": ["e1", "e2"], "exact_of": ["n1", "z"]})
    near = near_duplicates(pa.table({"a": ["n0"], "b": ["n1"], "a_length": [10], "b_length": [8], "similarity": [0.9]}))
    assert near.to_pylist() == [{"id": "n1", "duplicate_of": "n0", "similarity": 0.9, "kept": "n0"}]
    table = duplicates_table(exact, near)
    assert {r["id"]: (r["duplicate_of"], r["method"], r["kept"]) for r in table.to_pylist()} == {
        "e1": ("n1", "exact", "n0"), "e2": ("z", "exact", "z"), "n1": ("n0", "minhash", "n0"),
    }


# --------------------------------------------------------------------------- runs on Ray


@pytest.fixture(scope="module")
def corpus() -> dict:
    """Documents with known duplicates; ``expect`` maps each removed id to (reason, kept id)."""
    rng = random.Random(4)
    vocab = vocabulary(rng)
    docs: list[dict] = []
    expect: dict[str, tuple[str, str]] = {}

    def add(doc_id: str, text: str) -> None:
        docs.append({"id": doc_id, "text": text, "source": "web", "domain": "web", "url": None})

    def sentence(n: int) -> list[str]:
        return [rng.choice(vocab) for _ in range(n)]

    # exact: same words, different case/punctuation/spacing; the longest raw text survives
    words = sentence(80)
    add("exact/a", " ".join(words))
    add("exact/b", "  ".join(words).upper() + "!!!")  # longest
    add("exact/c", " ".join(words).title() + ".")
    expect |= {"exact/a": ("exact_duplicate", "exact/b"), "exact/c": ("exact_duplicate", "exact/b")}
    # near: a family of random word edits (Jaccard >= 0.8 with the base); ties in length -> smallest id
    base = sentence(300)
    add("near/0", " ".join(base))
    for k in range(1, 4):
        add(f"near/{k}", " ".join(edit(base, 2 + k, rng)))
    add("near/4", " ".join(base) + " " + " ".join(sentence(20)))  # longest
    expect |= {f"near/{k}": ("near_duplicate", "near/4") for k in range(4)}
    # an exact copy of a near-duplicate: exact of near/2, then gone with near/2's cluster
    add("near/2-copy", next(d["text"] for d in docs if d["id"] == "near/2").lower())
    expect["near/2-copy"] = ("exact_duplicate", "near/4")
    # below the threshold: shares a lot, but Jaccard < 0.8
    far = sentence(300)
    add("far/0", " ".join(far))
    add("far/1", " ".join(edit(far, 12, rng)))
    # unrelated documents
    for k in range(30):
        add(f"solo/{k:02d}", " ".join(sentence(rng.randint(20, 200))))
    return {"docs": docs, "expect": expect}


def write_shards(docs: list[dict], folder: Path, shards: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(docs)
    paths = []
    for k in range(shards):
        path = folder / f"part-{k}.parquet"
        pq.write_table(table.take(list(range(k, len(docs), shards))), path)
        paths.append(str(path))
    return paths


def run_dedup(tmp: Path, docs: list[dict], shards: int = 2, **config) -> tuple[dict, StageDir]:
    """Run the stage's ``run`` on shards written as an upstream stage's ``documents/``."""
    upstream = tmp / "upstream"
    write_shards(docs, upstream / "documents", shards)
    now = datetime.now(timezone.utc)
    manifest = Manifest(
        stage="filter", fingerprint="f", upstream={}, path=str(upstream),
        files=[f"documents/part-{k}.parquet" for k in range(shards)], code_version="1",
        crucible_version="test", started_at=now, finished_at=now,
    )
    out = StageDir.at(str(tmp / "store"), "dedup", "x")
    out.make()
    ctx = StageContext(name="dedup", config=DedupConfig(**config), pipeline=None, upstream={"filter": manifest},
                       out=out, log=RunLogger(None))
    result = run(ctx)

    def read(folder: str) -> pa.Table:
        files = sorted((Path(out.root) / folder).glob("*.parquet"))
        return pa.concat_tables([pq.read_table(f) for f in files]) if files else None

    return {"result": result, "documents": read("documents"), "rejected": read("rejected"),
            "duplicates": pq.read_table(Path(out.root) / "duplicates.parquet")}, out


@pytest.fixture(scope="module")
def default_run(corpus, ray_session, tmp_path_factory):
    return run_dedup(tmp_path_factory.mktemp("dedup"), corpus["docs"])[0]


def test_exact_and_near_clusters_keep_the_longest(corpus, default_run):
    rejected = default_run["rejected"]
    got = {row["id"]: (row["reason"], row["duplicate_of"]) for row in rejected.to_pylist()}
    duplicates = {row["id"]: row for row in default_run["duplicates"].to_pylist()}
    assert set(got) == set(corpus["expect"])
    for doc_id, (reason, kept) in corpus["expect"].items():
        assert got[doc_id][0] == reason
        assert duplicates[doc_id]["kept"] == kept
    assert got["exact/a"][1] == got["exact/c"][1] == "exact/b"
    assert got["near/2-copy"][1] == "near/2"  # points at its exact twin, which points on
    kept = set(default_run["documents"].column("id").to_pylist())
    assert {"exact/b", "near/4", "far/0", "far/1"} <= kept
    assert kept.isdisjoint(got) and len(kept) + len(got) == len(corpus["docs"])


def test_pair_below_threshold_is_not_merged(corpus, default_run):
    texts = {d["id"]: d["text"] for d in corpus["docs"]}
    assert 0.4 < naive_jaccard(texts["far/0"], texts["far/1"]) < 0.8  # a real candidate, rightly refused
    result = default_run["result"]
    assert result.counts["candidate_pairs"] > result.counts["verified_pairs"]
    assert 0 < result.metrics["candidate_precision"] < 1


def test_duplicates_parquet_content(corpus, default_run):
    duplicates = default_run["duplicates"]
    assert duplicates.column_names == ["id", "duplicate_of", "method", "similarity", "kept"]
    texts = {d["id"]: d["text"] for d in corpus["docs"]}
    for row in duplicates.to_pylist():
        if row["method"] == "exact":
            assert row["similarity"] == 1.0
        else:
            assert row["method"] == "minhash"
            assert row["similarity"] >= 0.8
            assert row["similarity"] == pytest.approx(naive_jaccard(texts[row["id"]], texts[row["duplicate_of"]]))
    assert duplicates.column("id").to_pylist() == sorted(duplicates.column("id").to_pylist())
    rejected = default_run["rejected"]
    assert set(rejected.column_names) == set(default_run["documents"].column_names) | {"reason", "duplicate_of"}
    result = default_run["result"]
    assert result.rows == len(corpus["docs"]) - len(corpus["expect"])
    assert result.counts["exact_duplicates"] == 3 and result.counts["exact_clusters"] == 2
    assert result.counts["near_duplicates"] == 4 and result.counts["near_clusters"] == 1
    assert "near-duplicates" in result.report and "Candidate pairs" in result.report


def test_survivors_do_not_depend_on_input_order_or_partitioning(corpus, default_run, tmp_path):
    shuffled = list(corpus["docs"])
    random.Random(5).shuffle(shuffled)
    again, _ = run_dedup(tmp_path, shuffled, shards=3, shuffle_partitions=5)
    assert again["duplicates"].equals(default_run["duplicates"])
    assert sorted(again["documents"].column("id").to_pylist()) == sorted(default_run["documents"].column("id").to_pylist())
