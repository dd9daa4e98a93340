"""``crucible rate``: the vote store, the rating app, its CLI, and a rater's path in headless Chromium.

The pipeline is not run: the evaluate stage's output is written by hand where the engine plans
it (the folder of the planned fingerprint, samples, report card, manifest last), so ``crucible
rate`` finds it exactly as it finds a real run's.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from deployments.services import _free_port as free_port
from flows.cli import main
from tasks.config import load_config
from tasks.data.chat_data import ChatSource, load_examples
from tasks.engine import plan
from tasks.errors import CrucibleError
from tasks.eval.elo import Game, bootstrap_elo
from tasks.feedback.rating_app import create_app
from tasks.feedback.rating_source import RatingSource
from tasks.feedback.votes import Vote, VoteStore, preference_rows, vote_games
from tasks.stage import Manifest
from tasks.store import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
PROMPTS = ["Name a colour.", "Add 2 and 3.", "Say hello.", "Count to three."]
REPLIES = {  # model -> reply per prompt; sft and untrained answer the last prompt alike: nothing to rate there
    "pretrain": ["blue", "5", "hello", "1 2 3"],
    "sft": ["Red is a colour.", "2 + 3 = 5.", "Hello!", "same"],
    "untrained": ["zzq", "qq", "xx", "same"],
}
PAIRS = 11  # 3 model pairs x 4 prompts, less the identical one
CARD = "## Report card\n\n| metric | sft |\n|---|---|\n| arena/elo | 1010 |\n"


def write_evaluate_output(folder: Path) -> list[str]:
    """The files evaluate writes that rating reads (plus a non-pairwise suite's samples); relative paths."""
    files = {"report_card.md": CARD}
    for model, replies in REPLIES.items():
        rows = [{"id": f"q{i}", "prompt": p, "reply": r, "reward": 0.1} for i, (p, r) in enumerate(zip(PROMPTS, replies))]
        files[f"samples/{model}/arena.jsonl"] = "".join(json.dumps(row) + "\n" for row in rows)
        files[f"samples/{model}/arithmetic.jsonl"] = json.dumps({"id": "1", "output": "4", "correct": True}) + "\n"
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return sorted(files)


@pytest.fixture
def source(tmp_path: Path) -> RatingSource:
    folder = tmp_path / "evaluate"
    return RatingSource(str(folder), tuple(write_evaluate_output(folder)), ("arena",))


@pytest.fixture
def store(tmp_path: Path) -> VoteStore:
    return VoteStore(tmp_path / "votes.sqlite")


def arena_config(tmp_path: Path) -> Path:
    """configs/tiny.yaml with a pairwise suite judged by a (placeholder) reward-model folder."""
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    cfg = tmp_path / "arena.yaml"
    cfg.write_text(
        f"base: {ROOT / 'configs' / 'tiny.yaml'}\nname: tiny-arena\n"
        f"evaluate:\n  judge: {tmp_path / 'judge'}\n  suites:\n    - {{name: arena, kind: pairwise, path: {tmp_path / 'prompts.jsonl'}}}\n"
    )
    return cfg


@pytest.fixture
def evaluated(tmp_home: Path, tmp_path: Path) -> Path:
    """An arena config whose evaluate stage is complete: its planned folder holds samples and a manifest."""
    cfg = arena_config(tmp_path)
    planned = plan(load_config(cfg))["evaluate"]
    folder = Path(planned.out.uri)
    files = write_evaluate_output(folder)
    now = datetime.now(timezone.utc)
    manifest = Manifest(
        stage="evaluate", fingerprint=planned.fingerprint, upstream=planned.upstream, path=str(folder), files=files,
        code_version="test", crucible_version="test", started_at=now, finished_at=now,
    )
    (folder / MANIFEST).write_text(manifest.model_dump_json())
    return cfg


def add_rater(config: Path, name: str, capsys) -> str:
    """The token in the link ``crucible rate CONFIG --add-rater NAME`` prints."""
    assert main(["rate", str(config), "--add-rater", name]) == 0
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert link.startswith("http://127.0.0.1:8765/?token=")
    return link.rsplit("token=", 1)[1]


@dataclass
class Served:
    url: str
    config: Path
    process: subprocess.Popen


@pytest.fixture
def served(evaluated: Path, tmp_home: Path) -> Iterator[Served]:
    """``crucible rate CONFIG`` in a subprocess on a free port. Killed at the end."""
    port = free_port()  # the services script's helper: a port nothing listens on
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "rate", str(evaluated), "--port", str(port)],
        cwd=ROOT, env={**os.environ, "CRUCIBLE_HOME": str(tmp_home)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/api/next", timeout=2)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"crucible rate did not start:\n{process.communicate()[0]}")
            time.sleep(0.2)
    try:
        yield Served(url, evaluated, process)
    finally:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------- pairs


def test_pairs_are_every_two_models_on_every_prompt(source: RatingSource):
    pairs = source.pairs()
    assert len(pairs) == PAIRS and len({p.pair_id for p in pairs}) == PAIRS
    assert {(p.model_a, p.model_b) for p in pairs} == {("pretrain", "sft"), ("pretrain", "untrained"), ("sft", "untrained")}
    colour = next(p for p in pairs if p.prompt_id == "q0" and p.model_a == "pretrain" and p.model_b == "sft")
    assert (colour.suite, colour.prompt, colour.reply_a, colour.reply_b) == ("arena", PROMPTS[0], "blue", "Red is a colour.")
    assert not [p for p in pairs if p.reply_a == p.reply_b]
    assert source.report_card() == CARD


def test_a_bad_samples_row_names_its_file_and_line(source: RatingSource):
    bad = Path(source.folder) / "samples" / "sft" / "arena.jsonl"
    bad.write_text(bad.read_text() + '{"id": "q9", "prompt": "x"}\n')
    with pytest.raises(CrucibleError, match=r"samples/sft/arena\.jsonl:5: no string field reply"):
        source.pairs()


def test_rate_refuses_until_evaluate_is_complete(tmp_home: Path, tmp_path: Path, capsys):
    assert main(["rate", str(arena_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "the evaluate stage is not complete" in err and "run the pipeline first: crucible run" in err
    assert main(["rate", "configs/tiny.yaml"]) == 2
    assert "no `kind: pairwise` suite" in capsys.readouterr().err
    assert main(["rate", "configs/tiny.yaml", "--add-rater", "ann smith"]) == 2
    assert "--add-rater: rater name 'ann smith'" in capsys.readouterr().err


def test_a_complete_evaluate_stage_is_found_through_the_engine(evaluated: Path):
    source = RatingSource.from_config(load_config(evaluated), str(evaluated))
    assert source.suites == ("arena",) and len(source.pairs()) == PAIRS and source.report_card() == CARD


# ---------------------------------------------------------------------------------- store


def test_one_vote_per_rater_per_pair(store: VoteStore, source: RatingSource):
    pair = source.pairs()[0]
    store.add_rater("ann"), store.add_rater("bob")
    assert store.record("ann", pair, "a") is True
    assert store.record("ann", pair, "b") is False  # a second verdict is refused, not an update
    assert store.record("bob", pair, "tie") is True
    assert [(v.rater, v.winner) for v in store.votes()] == [("ann", "a"), ("bob", "tie")]
    with sqlite3.connect(store.path) as db, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("INSERT INTO votes (rater, pair_id, winner, at) VALUES ('ann', ?, 'b', 'now')", (pair.pair_id,))
    with pytest.raises(ValueError, match="winner must be one of"):
        store.record("bob", source.pairs()[1], "left")


def test_tokens_are_secret_and_replaceable(store: VoteStore, source: RatingSource):
    token = store.add_rater("ann")
    assert store.rater(token) == "ann" and store.rater("nope") is None and store.rater("") is None
    on_disk = b"".join(f.read_bytes() for f in store.path.parent.glob(f"{store.path.name}*"))  # the database, its WAL if any
    assert b"ann" in on_disk and token.encode() not in on_disk
    store.record("ann", source.pairs()[0], "a")
    again = store.add_rater("ann")
    assert store.rater(token) is None and store.rater(again) == "ann" and len(store.votes()) == 1


def test_digest_follows_the_votes(store: VoteStore, source: RatingSource):
    store.add_rater("ann")
    empty = store.digest()
    store.record("ann", source.pairs()[0], "a")
    one = store.digest()
    assert one != empty and VoteStore(store.path).digest() == one


def test_export_rows_are_preference_data(tmp_home: Path, evaluated: Path, source: RatingSource, tmp_path: Path, capsys):
    store = VoteStore.for_pipeline("tiny-arena")
    for rater in ("ann", "bob", "cy"):
        store.add_rater(rater)
    p = source.pairs()
    verdicts = {0: ["a", "a", "b"], 1: ["b"], 2: ["a", "b"], 3: ["tie"], 4: ["both_bad", "a"]}
    for index, winners in verdicts.items():
        for rater, winner in zip(("ann", "bob", "cy"), winners):
            store.record(rater, p[index], winner)
    out = tmp_path / "human.jsonl"
    assert main(["rate", str(evaluated), "--export", str(out)]) == 0
    assert "2 preference rows; 3 voted pairs skipped" in capsys.readouterr().out
    loaded = load_examples([ChatSource(name="human", path=str(out))], "preference", "reward.data")
    assert loaded.quarantine == [] and len(loaded.rows) == 2
    chosen = {ex.value.prompt[0]["content"]: (ex.value.chosen[0]["content"], ex.value.rejected[0]["content"]) for ex in loaded.rows}
    assert chosen[p[0].prompt] == (p[0].reply_a, p[0].reply_b) and chosen[p[1].prompt] == (p[1].reply_b, p[1].reply_a)


# ---------------------------------------------------------------------------------- elo


def games(counts: dict[tuple[str, str], tuple[int, int]]) -> list[Game]:
    """(a, b) -> (a's wins, b's wins), interleaved."""
    out = []
    for (a, b), (wins, losses) in counts.items():
        results = [1.0] * wins + [0.0] * losses
        out += [Game(a, b, s) for s in results[::2] + results[1::2]]
    return out


def test_bootstrap_intervals_contain_the_rating_and_shrink_with_more_games():
    few = games({("x", "y"): (6, 4), ("y", "z"): (6, 4), ("x", "z"): (7, 3)})
    many = games({pair: (w * 16, l * 16) for pair, (w, l) in {("x", "y"): (6, 4), ("y", "z"): (6, 4), ("x", "z"): (7, 3)}.items()})
    narrow, wide = bootstrap_elo(many, seed=1), bootstrap_elo(few, seed=1)
    for result in (narrow, wide):
        assert all(low < rating < high for rating, low, high in result.values())
    assert all(narrow[m][2] - narrow[m][1] < 0.75 * (wide[m][2] - wide[m][1]) for m in "xyz")
    assert bootstrap_elo(few, seed=1) == wide  # seeded: the same games give the same table


def test_a_model_that_always_wins_ranks_first(store: VoteStore, source: RatingSource):
    store.add_rater("ann")
    for pair in source.pairs():  # sft wins every comparison it is in; the rest are ties
        store.record("ann", pair, "a" if pair.model_a == "sft" else "b" if pair.model_b == "sft" else "tie")
    ratings = bootstrap_elo(vote_games(store.votes()))
    assert max(ratings, key=lambda m: ratings[m][0]) == "sft"
    assert ratings["sft"][1] > max(ratings[m][0] for m in ratings if m != "sft")
    assert preference_rows(store.votes()) and all(row["chosen"] in REPLIES["sft"] for row in preference_rows(store.votes()))


# ---------------------------------------------------------------------------------- app


def test_requests_without_a_valid_token_get_401(store: VoteStore, source: RatingSource):
    token = store.add_rater("ann")
    app = create_app(source.pairs(), store)
    for client, query in ((TestClient(app), ""), (TestClient(app), "?token=bad"), (TestClient(app, cookies={"crucible_rater": "bad"}), "")):
        for path in ("/", "/report", "/api/next"):
            assert client.get(path + query).status_code == 401, (path, query)
        assert client.post("/api/vote" + query, json={"pair_id": "x", "verdict": "left"}).status_code == 401
    with TestClient(app) as client:
        assert client.get(f"/?token={token}").status_code == 200  # the link sets the cookie the rest use
        assert client.get("/api/next").status_code == 200 and client.get("/report").status_code == 200
    assert store.votes() == []


def test_votes_are_stored_against_what_the_page_showed(store: VoteStore, source: RatingSource):
    token = store.add_rater("ann")
    with TestClient(create_app(source.pairs(), store)) as client:
        client.get(f"/?token={token}")
        state, seen, sides = client.get("/api/next").json(), set(), set()
        while state["pair"]:
            shown = state["pair"]
            assert shown["id"] not in seen  # a judged pair never comes back
            seen.add(shown["id"])
            state = client.post("/api/vote", json={"pair_id": shown["id"], "verdict": "left"}).json()
            assert state["recorded"] and state["count"] == len(seen) and state["remaining"] == PAIRS - len(seen)
            vote = store.votes()[-1]
            winner, loser = (vote.pair.reply_a, vote.pair.reply_b) if vote.winner == "a" else (vote.pair.reply_b, vote.pair.reply_a)
            assert (winner, loser) == (shown["left"], shown["right"])
            sides.add(vote.winner)
        assert len(seen) == PAIRS and sides == {"a", "b"}  # both orders were shown
        again = client.post("/api/vote", json={"pair_id": shown["id"], "verdict": "right"})
        assert again.json()["recorded"] is False and len(store.votes()) == PAIRS
        bad = client.post("/api/vote", json={"pair_id": shown["id"], "verdict": "up"})
        assert bad.status_code == 422 and "verdict" in bad.json()["error"]


def test_a_vote_survives_a_killed_server(served: Served, capsys):
    token = add_rater(served.config, "ann", capsys)
    with httpx.Client(base_url=served.url, timeout=30) as client:
        client.get(f"/?token={token}")
        shown = client.get("/api/next").json()["pair"]
        answer = client.post("/api/vote", json={"pair_id": shown["id"], "verdict": "tie"})
        assert answer.status_code == 200 and answer.json()["count"] == 1
    served.process.send_signal(signal.SIGKILL)  # no shutdown, no checkpoint of the WAL
    served.process.wait(10)
    votes = VoteStore.for_pipeline("tiny-arena").votes()
    assert [(v.rater, v.pair.pair_id, v.winner) for v in votes] == [("ann", shown["id"], "tie")]


# ---------------------------------------------------------------------------------- browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM}: `make install` as root installs Debian's chromium")
def test_rating_in_a_browser(served: Served, tmp_path: Path, capsys):
    from playwright.sync_api import expect, sync_playwright

    token = add_rater(served.config, "ann", capsys)
    url = served.url
    store = VoteStore.for_pipeline("tiny-arena")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{url}/?token={token}")
            assert page.url == f"{url}/"  # the token moved to a cookie
            count, remaining = page.locator("#count"), page.locator("#remaining")
            expect(remaining).to_have_text(str(PAIRS))
            expect(count).to_have_text("0")
            page.screenshot(path=tmp_path / "rate.png", full_page=True)

            def vote(press: Callable[[], None]) -> tuple[Vote, str, str]:
                """Press, wait for the count to rise; the stored vote and the replies that were shown."""
                left, right, before = page.locator("#left").inner_text(), page.locator("#right").inner_text(), len(store.votes())
                press()
                expect(count).to_have_text(str(before + 1))
                return store.votes()[-1], left, right

            vote_a, left, _ = vote(lambda: page.get_by_role("button", name="A is better").click())
            assert left == (vote_a.pair.reply_a if vote_a.winner == "a" else vote_a.pair.reply_b)
            vote_b, _, right = vote(lambda: page.keyboard.press("ArrowRight"))
            assert right == (vote_b.pair.reply_a if vote_b.winner == "a" else vote_b.pair.reply_b)
            for key, winner in (("3", "tie"), ("b", "both_bad"), ("1", None), ("2", None), ("t", "tie"), ("4", "both_bad")):
                cast, _, _ = vote(lambda: page.keyboard.press(key))
                assert winner is None or cast.winner == winner
            page.get_by_role("button", name="Tie").click()
            expect(count).to_have_text("9")
            page.keyboard.press("ArrowLeft")
            expect(count).to_have_text("10")
            page.keyboard.press("ArrowLeft")
            expect(page.get_by_text("Nothing left to rate")).to_be_visible()
            expect(count).to_have_text(str(PAIRS))
            assert len({v.pair.pair_id for v in store.votes()}) == PAIRS  # no pair was shown twice

            stranger = browser.new_context().new_page()
            for refused in (f"{url}/?token=not-a-token", f"{url}/", f"{url}/report"):
                response = stranger.goto(refused)
                assert response.status == 401 and "401" in stranger.content()

            page.goto(f"{url}/report")
            rows = page.locator("#elo tbody tr")
            expect(rows).to_have_count(3)
            for row in rows.all():
                model, rating, interval = (cell.inner_text() for cell in row.locator("td").all()[:3])
                low, high = (float(x) for x in interval.split(" – "))
                assert model in REPLIES and low <= float(rating) <= high
            expect(page.locator("#pairs tbody tr")).to_have_count(3)
            expect(page.get_by_text("arena/elo")).to_be_visible()  # the evaluate stage's report card
            page.screenshot(path=tmp_path / "report.png", full_page=True)  # both kept for a look at the pages
        finally:
            browser.close()
