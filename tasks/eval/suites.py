"""Every suite kind, as one config type: ``kind`` picks the format and the scoring.

| kind | rows | metrics |
|---|---|---|
| ``perplexity`` | ``text``, ``domain`` | ``bpb``, ``bpb.<domain>``, ``ppl.<domain>`` |
| ``multiple_choice`` | ``question``, ``choices``, ``answer`` | ``acc``, ``acc_char``, ``acc_token`` |
| ``exact_match`` | ``prompt``, ``answer`` | ``exact_match``, ``exact_match_sampled``, ``maj@n`` |
| ``code`` | HumanEval's ``task_id``, ``prompt``, ``test``, ``entry_point`` | ``pass@k``, ``sandbox.<status>`` |
| ``safety`` | ``prompt``, ``harmful`` | ``refusal_rate``, ``over_refusal_rate`` |
| ``pairwise`` | ``prompt`` | ``elo``, ``win_rate``, ``reward`` (reward-model judge), ``human_elo[_low,_high]`` (votes) |
| ``preference`` | ``prompt``, ``chosen``, ``rejected`` | ``accuracy``, ``logp_margin``, ``reward_accuracy``, ``reward_margin`` |
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tasks.eval.choice import ChoiceSuite
from tasks.eval.code_exec import CodeSuite
from tasks.eval.exact_match import ExactMatchSuite
from tasks.eval.pairwise import PairwiseSuite
from tasks.eval.perplexity import PerplexitySuite
from tasks.eval.preference import PreferenceSuite
from tasks.eval.safety import SafetySuite

SuiteConfig = Annotated[
    PerplexitySuite | ChoiceSuite | ExactMatchSuite | CodeSuite | SafetySuite | PairwiseSuite | PreferenceSuite,
    Field(discriminator="kind"),
]

# Whether a higher value of a metric is better; the report card marks each row with it.
LOWER_IS_BETTER_PREFIXES = ("bpb", "ppl", "over_refusal_rate", "sandbox.")


def higher_is_better(metric: str) -> bool:
    return not metric.split("/")[-1].startswith(LOWER_IS_BETTER_PREFIXES) or metric.endswith("sandbox.passed")
