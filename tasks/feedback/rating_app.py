"""``crucible rate``: the rating web app (Starlette, served by uvicorn on 127.0.0.1 by default).

Routes (every one needs a rater's token: ``?token=`` on the link, then an HTTP-only cookie the
link sets; without a valid one the answer is 401):

- ``GET /`` the rating page; ``GET /report`` human Elo with 95% intervals, win rates per model
  pair and the evaluate stage's report card;
- ``GET /api/next`` and ``POST /api/vote`` (``{"pair_id", "verdict"}``) answer the rater's vote
  count, how many pairs are left and the next pair (a random one the rater has not judged), so
  the page shows the next pair as soon as a vote is stored.

The page shows replies as "Model A" (left) and "Model B" (right): positions, not models. Which
model is on the left is derived from a secret of the vote store, the rater and the pair, so it
looks random, never reaches the browser, and is the same after a restart: a vote sent to a
restarted server is read against what the page showed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from tasks.feedback.rating_pages import rate_page, report_page
from tasks.feedback.rating_source import RatingSource
from tasks.feedback.votes import VERDICTS, RatedPair, VoteStore, preference_rows, winner_of

COOKIE = "crucible_rater"
UNAUTHORISED = "401 Unauthorized: open the link `crucible rate CONFIG --add-rater NAME` printed for you.\n"


class VoteRequest(BaseModel):
    """What the page posts for one vote: the pair it showed and the side picked."""

    model_config = ConfigDict(extra="forbid")

    pair_id: str
    verdict: Literal[VERDICTS]  # type: ignore[valid-type]


class Unauthorised(Exception):
    """No valid rater token on the request."""


def a_on_left(secret: bytes, rater: str, pair_id: str) -> bool:
    """Whether the page shows reply ``a`` on the left for this rater and pair (stable, unguessable)."""
    return hmac.new(secret, f"{rater}\0{pair_id}".encode(), hashlib.sha256).digest()[0] & 1 == 1


def create_app(pairs: list[RatedPair], store: VoteStore, report_card: str = "") -> Starlette:
    """The app over ``pairs`` (this run's), storing votes in ``store``."""
    by_id = {pair.pair_id: pair for pair in pairs}
    secret = store.secret()
    rng = random.Random()

    def rater_of(request: Request) -> str:
        token = request.query_params.get("token") or request.cookies.get(COOKIE, "")
        rater = store.rater(token)
        if rater is None:
            raise Unauthorised
        return rater

    def state(rater: str) -> dict:
        """The rater's count, what is left, and the next pair as the page shows it."""
        judged = store.judged(rater)
        left = [pair_id for pair_id in by_id if pair_id not in judged]
        shown = None
        if left:
            pair = by_id[rng.choice(left)]
            first, second = (pair.reply_a, pair.reply_b) if a_on_left(secret, rater, pair.pair_id) else (pair.reply_b, pair.reply_a)
            shown = {"id": pair.pair_id, "suite": pair.suite, "prompt": pair.prompt, "left": first, "right": second}
        return {"rater": rater, "count": len(judged), "remaining": len(left), "pair": shown}

    def index(request: Request) -> Response:
        rater = rater_of(request)
        token = request.query_params.get("token")
        if token:  # keep the token in a cookie and out of the address bar, history and screenshots
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        return HTMLResponse(rate_page(rater, len(store.judged(rater))))

    def next_pair(request: Request) -> Response:
        return JSONResponse(state(rater_of(request)))

    def record(rater: str, pair: RatedPair, verdict: str) -> dict:
        recorded = store.record(rater, pair, winner_of(verdict, a_on_left(secret, rater, pair.pair_id)))
        return {**state(rater), "recorded": recorded}

    async def vote(request: Request) -> Response:
        rater = await run_in_threadpool(rater_of, request)
        try:
            body = VoteRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            return JSONResponse({"error": problems}, status_code=422)
        pair = by_id.get(body.pair_id)
        if pair is None:
            return JSONResponse({"error": f"pair_id: no pair {body.pair_id!r} in this run"}, status_code=404)
        return JSONResponse(await run_in_threadpool(record, rater, pair, body.verdict))  # SQLite's fsync off the event loop

    def report(request: Request) -> Response:
        rater_of(request)
        votes = store.votes()
        current = [v for v in votes if v.pair.pair_id in by_id]
        return HTMLResponse(report_page(current, len(votes) - len(current), report_card))

    def unauthorised(_request: Request, _exc: Exception) -> Response:
        return PlainTextResponse(UNAUTHORISED, status_code=401)

    routes = [
        Route("/", index),
        Route("/report", report),
        Route("/api/next", next_pair),
        Route("/api/vote", vote, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={Unauthorised: unauthorised})


def rater_link(token: str, host: str, port: int) -> str:
    return f"http://{host}:{port}/?token={token}"


def export_preferences(store: VoteStore, path: Path) -> tuple[int, int]:
    """Write the votes' preference rows as JSONL; returns (rows written, voted pairs skipped)."""
    votes = store.votes()
    rows = preference_rows(votes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return len(rows), len({v.pair.pair_id for v in votes}) - len(rows)


def serve(source: RatingSource, store: VoteStore, host: str, port: int) -> None:
    """Serve the rating app until interrupted."""
    import uvicorn

    pairs = source.pairs()
    print(f"Rating {len(pairs)} pairs of replies ({', '.join(source.suites)}) at http://{host}:{port}/ (raters open their own links)")
    uvicorn.run(create_app(pairs, store, source.report_card()), host=host, port=port, log_level="warning")
