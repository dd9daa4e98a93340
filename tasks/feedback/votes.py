"""People's votes on pairs of replies: a durable store, Elo games and preference rows from them.

One SQLite file per pipeline in the state dir (``ratings/<pipeline>.sqlite``). Every vote is its
own transaction in WAL mode with ``synchronous=FULL``, so a vote the page was told is recorded
survives the server being killed the moment after. A UNIQUE constraint keeps one vote per rater
per pair whatever the page or a replayed request sends. Raters hold secret tokens; the store
keeps only their SHA-256.

A pair's two models are in sorted order (``a`` < ``b``); which reply the page showed on the left
is presentation only, so votes are stored as ``a``/``b``/``tie``/``both_bad``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, get_args

from tasks.eval.elo import Game
from tasks.paths import state_dir

VERDICTS = ("left", "right", "tie", "both_bad")  # what the page offers
Winner = Literal["a", "b", "tie", "both_bad"]  # what the store keeps
WINNERS: tuple[str, ...] = get_args(Winner)
GAME_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
RATER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY,
    suite TEXT NOT NULL, prompt_id TEXT NOT NULL, prompt TEXT NOT NULL,
    model_a TEXT NOT NULL, reply_a TEXT NOT NULL, model_b TEXT NOT NULL, reply_b TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rater TEXT NOT NULL REFERENCES raters(name),
    pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
    at TEXT NOT NULL,
    UNIQUE (rater, pair_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RatedPair:
    """One prompt answered by two models of the run (``a``, ``b`` in sorted model order)."""

    suite: str
    prompt_id: str
    prompt: str
    model_a: str
    reply_a: str
    model_b: str
    reply_b: str

    @property
    def pair_id(self) -> str:
        """Stable across runs and restarts: the same replies to the same prompt are the same pair,
        and a re-run evaluate whose replies changed gives new pairs (old votes stay with the old text)."""
        key = [self.suite, self.prompt_id, self.model_a, self.reply_a, self.model_b, self.reply_b]
        return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Vote:
    rater: str
    pair: RatedPair
    winner: Winner
    at: str  # ISO 8601, UTC


def winner_of(verdict: str, a_on_left: bool) -> Winner:
    """The stored winner for a verdict the page reported about what it showed."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if verdict in ("left", "right"):
        return "a" if (verdict == "left") == a_on_left else "b"
    return verdict  # type: ignore[return-value]  # tie / both_bad


class VoteStore:
    """The votes of one pipeline's raters, in one SQLite file (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @classmethod
    def for_pipeline(cls, name: str) -> VoteStore:
        return cls(state_dir() / "ratings" / f"{name}.sqlite")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection per operation: the server's worker threads never share one, and each
        ``with`` block is one transaction, committed (and synced) before it returns."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db
        finally:
            db.close()

    # ------------------------------------------------------------------------------ raters

    def add_rater(self, name: str) -> str:
        """A new secret token for ``name``. Adding a rater again replaces the token (a lost link
        is re-issued; the old one stops working) and keeps the rater's votes."""
        if not RATER_NAME.match(name):
            raise ValueError(f"rater name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
        token = secrets.token_urlsafe(24)
        with self._connect() as db:
            db.execute(
                "INSERT INTO raters (name, token_sha256, added_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256",
                (name, _sha256(token), _now()),
            )
        return token

    def rater(self, token: str) -> str | None:
        """The rater a token belongs to, or None."""
        if not token:
            return None
        with self._connect() as db:
            row = db.execute("SELECT name FROM raters WHERE token_sha256 = ?", (_sha256(token),)).fetchone()
        return row[0] if row else None

    def secret(self) -> bytes:
        """A random key made once per store: it lets the page derive a stable, unguessable
        left/right order for each rater and pair, so a restart never flips a pending vote."""
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('secret', ?)", (secrets.token_hex(32),))
            return bytes.fromhex(db.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])

    # ------------------------------------------------------------------------------ votes

    def record(self, rater: str, pair: RatedPair, winner: str) -> bool:
        """Store one vote, committed before returning; False if this rater already voted on the pair."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (pair.pair_id, pair.suite, pair.prompt_id, pair.prompt, pair.model_a, pair.reply_a, pair.model_b, pair.reply_b),
            )
            cursor = db.execute(
                "INSERT INTO votes (rater, pair_id, winner, at) VALUES (?, ?, ?, ?) ON CONFLICT(rater, pair_id) DO NOTHING",
                (rater, pair.pair_id, winner, _now()),
            )
            return cursor.rowcount == 1

    def judged(self, rater: str) -> set[str]:
        """Ids of the pairs this rater has voted on."""
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT pair_id FROM votes WHERE rater = ?", (rater,))}

    def votes(self, suite: str | None = None) -> list[Vote]:
        """Every vote (of one suite, if given), in the order they were cast."""
        query = (
            "SELECT v.rater, v.winner, v.at, p.suite, p.prompt_id, p.prompt, p.model_a, p.reply_a, p.model_b, p.reply_b "
            "FROM votes v JOIN pairs p USING (pair_id)"
        )
        with self._connect() as db:
            if suite is None:
                rows = db.execute(query + " ORDER BY v.seq").fetchall()
            else:
                rows = db.execute(query + " WHERE p.suite = ? ORDER BY v.seq", (suite,)).fetchall()
        return [Vote(rater, RatedPair(*pair), winner, at) for rater, winner, at, *pair in rows]

    def digest(self) -> str:
        """Content digest of all votes (who, which pair, which verdict; not when), independent
        of the order they were cast: an input of the evaluate stage's fingerprint."""
        records = sorted((v.rater, v.pair.pair_id, v.winner) for v in self.votes())
        return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def vote_games(votes: list[Vote]) -> list[Game]:
    """One Elo game per vote; a tie and "both bad" count one half to each model."""
    return [Game(v.pair.model_a, v.pair.model_b, GAME_SCORE[v.winner]) for v in votes]


def preference_rows(votes: list[Vote]) -> list[dict]:
    """Preference rows (``id``, ``prompt``, ``chosen``, ``rejected``) for the reward model and DPO.

    One row per pair whose votes give one reply a strict majority of all its votes (ties and
    "both bad" count against a majority: they say neither reply is the one to learn from).
    Pairs without a majority, or with a blank or repeated reply (which preference data cannot
    hold), are left out; the caller reports ``pairs voted on - rows`` as skipped.
    """
    by_pair: dict[str, list[Vote]] = {}
    for vote in votes:
        by_pair.setdefault(vote.pair.pair_id, []).append(vote)
    rows = []
    for pair_id, pair_votes in by_pair.items():
        pair = pair_votes[0].pair
        (top, count), *_ = Counter(v.winner for v in pair_votes).most_common(1)
        usable = pair.reply_a.strip() and pair.reply_b.strip() and pair.reply_a != pair.reply_b
        if top not in ("a", "b") or 2 * count <= len(pair_votes) or not usable:
            continue
        chosen, rejected = (pair.reply_a, pair.reply_b) if top == "a" else (pair.reply_b, pair.reply_a)
        rows.append({"id": pair_id, "prompt": pair.prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
