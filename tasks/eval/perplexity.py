"""Perplexity and bits per byte on held-out text, per domain.

Row format (JSONL): ``{"text": str, "domain": str = "all", "id": str?}``.

Metrics: ``bpb.<domain>`` (bits per UTF-8 byte: the total negative log-likelihood in bits over
the text's bytes; comparable across tokenizers, so across our checkpoints *and* baselines),
``ppl.<domain>`` (per-token perplexity; comparable only between models sharing a tokenizer),
and ``bpb`` over all domains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tasks.eval.suite import EvalSettings, Row, SuiteBase, SuiteOutput

if TYPE_CHECKING:  # torch-heavy: imported where models run, not when configs load
    from tasks.eval.lm import LanguageModel



class TextRow(Row):
    text: str = Field(..., min_length=1)
    domain: str = "all"


class PerplexitySuite(SuiteBase):
    """Held-out text scored token by token (lm-eval's rolling log-likelihood)."""

    row_model = TextRow
    kind: Literal["perplexity"] = "perplexity"
    stride: int | None = Field(
        None, ge=1, description="tokens newly scored per window of a long text; default: the whole window (disjoint windows)"
    )

    def evaluate(self, lm: LanguageModel, rows: list[TextRow], settings: EvalSettings) -> SuiteOutput:
        scores = lm.rolling_loglikelihood([r.text for r in rows], self.stride)
        totals: dict[str, list[float]] = {}  # domain -> [nll nats, tokens, bytes]
        samples = []
        for row, (logprob, tokens) in zip(rows, scores):
            n_bytes = len(row.text.encode("utf-8"))
            for key in (row.domain, "*"):
                total = totals.setdefault(key, [0.0, 0, 0])
                total[0] -= logprob
                total[1] += tokens
                total[2] += n_bytes
            samples.append({"id": row.id, "domain": row.domain, "tokens": tokens, "bytes": n_bytes,
                            "bpb": -logprob / math.log(2) / n_bytes})
        metrics = {}
        for domain, (nll, tokens, n_bytes) in sorted(totals.items()):
            if domain == "*":
                metrics["bpb"] = nll / math.log(2) / n_bytes
                continue
            metrics[f"bpb.{domain}"] = nll / math.log(2) / n_bytes
            metrics[f"ppl.{domain}"] = math.exp(min(nll / tokens, 50.0))
        return SuiteOutput(metrics, samples)
