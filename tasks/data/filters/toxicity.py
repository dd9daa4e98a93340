"""Offensive-language scores from alt-profanity-check: a linear SVM over TF-IDF features.

The model and vectorizer ship inside the wheel (``profanity_check/data``) and run on the
installed scikit-learn, so scoring is offline and vectorised over a whole batch. The score is
the probability that the document as a whole is offensive: a long article quoting one insult
scores low, a rant scores high.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ToxicityConfig(BaseModel):
    """Drop documents whose offensive-language probability exceeds ``max_score``."""

    model_config = ConfigDict(extra="forbid")

    max_score: float = Field(0.8, ge=0.0, le=1.0, description="drop documents scoring above this (0..1)")


def toxicity_scores(texts: Sequence[str]) -> np.ndarray:
    """Probability of offensive language for each text (loads the bundled model on first use)."""
    if not texts:
        return np.zeros(0, dtype=np.float64)
    from profanity_check import predict_prob

    return np.asarray(predict_prob(list(texts)), dtype=np.float64)


def toxicity_reason(score: float, cfg: ToxicityConfig) -> str | None:
    return "toxicity" if score > cfg.max_score else None
