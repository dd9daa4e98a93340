"""The two pages of ``crucible rate``: the rating page (HTML + a little JavaScript) and the report.

Plain HTML, no build step and nothing fetched from elsewhere: the server may run on a machine
without internet. Everything interpolated into HTML is escaped; replies are model output.
"""

from __future__ import annotations

from collections import Counter
from html import escape

from tasks.eval.elo import bootstrap_elo, win_rates
from tasks.feedback.votes import Vote, vote_games

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
header { display: flex; justify-content: space-between; align-items: baseline; gap: 1rem; }
.prompt, .reply { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 6px; padding: .8rem; }
.prompt { background: #f4f4f4; }
.replies { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
.buttons { display: flex; gap: .6rem; flex-wrap: wrap; }
button { font-size: 1rem; padding: .5rem 1rem; cursor: pointer; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3rem; font-size: .85em; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: .3rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f4f4f4; padding: .8rem; overflow-x: auto; }
"""

RATE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Crucible: rate replies</title><style>{style}</style></head>
<body>
<header><h1>Which reply is better?</h1>
<p>Rating as <b>{rater}</b> · your votes: <b id="count">{count}</b> · left to rate: <b id="remaining">…</b>
· <a href="/report">report</a></p></header>
<main id="rate" hidden>
<h2>Prompt</h2><div class="prompt" id="prompt"></div>
<div class="replies">
<section><h2>Model A</h2><div class="reply" id="left"></div></section>
<section><h2>Model B</h2><div class="reply" id="right"></div></section>
</div>
<div class="buttons">
<button data-verdict="left">A is better <kbd>1</kbd> <kbd>←</kbd></button>
<button data-verdict="right">B is better <kbd>2</kbd> <kbd>→</kbd></button>
<button data-verdict="tie">Tie <kbd>3</kbd> <kbd>t</kbd></button>
<button data-verdict="both_bad">Both bad <kbd>4</kbd> <kbd>b</kbd></button>
</div>
</main>
<p id="done" hidden>Nothing left to rate: you have judged every pair. Thank you!</p>
<p id="error" role="alert"></p>
<script>
{script}</script>
</body></html>
"""

SCRIPT = """
const KEYS = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right",
              "3": "tie", "t": "tie", "4": "both_bad", "b": "both_bad"};
let pair = null, busy = false;

function show(state) {
  document.getElementById("count").textContent = state.count;
  document.getElementById("remaining").textContent = state.remaining;
  pair = state.pair;
  document.getElementById("rate").hidden = !pair;
  document.getElementById("done").hidden = !!pair;
  if (pair) {
    for (const part of ["prompt", "left", "right"]) document.getElementById(part).textContent = pair[part];
  }
}

async function call(path, body) {
  const response = await fetch(path, body ? {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(body)} : {});
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

async function vote(verdict) {
  if (!pair || busy) return;
  busy = true;
  try {
    show(await call("/api/vote", {pair_id: pair.id, verdict}));
    document.getElementById("error").textContent = "";
  } catch (error) {
    document.getElementById("error").textContent = `Vote not recorded: ${error.message}`;
  } finally {
    busy = false;
  }
}

document.querySelectorAll("button[data-verdict]").forEach(b => b.addEventListener("click", () => vote(b.dataset.verdict)));
document.addEventListener("keydown", event => {
  if (!event.ctrlKey && !event.metaKey && !event.altKey && KEYS[event.key]) { event.preventDefault(); vote(KEYS[event.key]); }
});
call("/api/next").then(show).catch(error => { document.getElementById("error").textContent = error.message; });
"""

REPORT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Crucible: human ratings</title><style>{style}</style></head>
<body>
<header><h1>Human ratings</h1><p><a href="/">rate more</a></p></header>
{body}
</body></html>
"""


def rate_page(rater: str, count: int) -> str:
    return RATE_PAGE.format(style=STYLE, rater=escape(rater), count=count, script=SCRIPT)


def report_page(votes: list[Vote], older: int, report_card: str) -> str:
    """Human Elo (bootstrap 95% intervals) and win rates per model pair from ``votes`` (this run's
    pairs), a note on ``older`` votes about replies this run no longer has, and the evaluate
    stage's report card."""
    parts = [f"<p>{len(votes)} votes by {len({v.rater for v in votes})} rater(s) on this run's replies.</p>"]
    if older:
        parts.append(f"<p>{older} older votes judged replies this run no longer has (an earlier evaluate); they count in exports, not here.</p>")
    if votes:
        parts += ["<h2>Human Elo</h2>", _elo_table(votes), "<h2>Win rates per model pair</h2>", _pair_table(votes)]
    if report_card:
        parts += ["<h2>Evaluate report card</h2>", f"<pre>{escape(report_card)}</pre>"]
    return REPORT_PAGE.format(style=STYLE, body="\n".join(parts))


def _table(header: list[str], rows: list[list[str]], id_: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _elo_table(votes: list[Vote]) -> str:
    games = vote_games(votes)
    elo, wins = bootstrap_elo(games), win_rates(games)
    played = Counter(player for g in games for player in (g.a, g.b))
    ranked = sorted(elo, key=lambda m: -elo[m][0])
    rows = [[m, f"{elo[m][0]:.0f}", f"{elo[m][1]:.0f} – {elo[m][2]:.0f}", str(played[m]), f"{wins[m]:.2f}"] for m in ranked]
    return _table(["model", "Elo", "95% interval", "votes", "win rate"], rows, "elo")


def _pair_table(votes: list[Vote]) -> str:
    """Per model pair: each verdict's count and the first model's win rate (ties and "both bad" count half)."""
    counts: dict[tuple[str, str], Counter[str]] = {}
    for vote in votes:
        counts.setdefault((vote.pair.model_a, vote.pair.model_b), Counter())[vote.winner] += 1
    rows = []
    for (a, b), c in sorted(counts.items()):
        n = sum(c.values())
        rate = (c["a"] + 0.5 * (c["tie"] + c["both_bad"])) / n
        rows.append([f"{a} vs {b}", str(n), str(c["a"]), str(c["b"]), str(c["tie"]), str(c["both_bad"]), f"{rate:.2f}"])
    return _table(["pair (A vs B)", "votes", "A won", "B won", "tie", "both bad", "A's win rate"], rows, "pairs")
