"""Post-training loss arithmetic against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.train.post_objectives import (
    AdaptiveKLController,
    bradley_terry_loss,
    clipped_policy_loss,
    clipped_value_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    reply_nll,
    token_entropy,
    token_logprobs,
)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_the_formula_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: beta*((-10+11) - (-12+11.5)) = 0.1*1.5 = 0.15; pair 2: 0.1*((1) - (-1)) = 0.2
    expected = -(_logsigmoid(0.15) + _logsigmoid(0.2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.1])
    assert rejected.tolist() == pytest.approx([-0.05, -0.1])


def test_dpo_label_smoothing_mixes_in_the_flipped_label():
    z = 0.1 * 2.0  # one pair with log-ratio gap 2
    loss, _, _ = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1, 0.25)
    assert loss.item() == pytest.approx(-0.75 * _logsigmoid(z) - 0.25 * _logsigmoid(-z), rel=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logp = torch.tensor([-3.0, -7.0])
    loss, chosen, rejected = dpo_loss(logp, logp - 1, logp, logp - 1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_reply_nll_is_the_per_token_nll_averaged_over_replies():
    # replies of 4 and 2 tokens with summed log-probs -8 and -3: per-token NLL 2 and 1.5
    assert reply_nll(torch.tensor([-8.0, -3.0]), torch.tensor([4, 2])).item() == pytest.approx(1.75)


def test_bradley_terry_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(-(_logsigmoid(1.0) + _logsigmoid(-0.5)) / 2)
    margin = torch.tensor([0.5, 0.0])
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(-(_logsigmoid(0.5) + _logsigmoid(-0.5)) / 2)


def test_token_logprobs_are_aligned_with_the_token_they_score():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    ids = torch.tensor([[0, 1, 2]])
    out = token_logprobs(logits, ids)
    assert out.shape == ids.shape
    assert out[0].tolist() == pytest.approx([0.0, math.log(0.2), math.log(0.8)], rel=1e-5)
    entropy = token_entropy(logits)
    assert entropy[0, 1].item() == pytest.approx(-sum(p * math.log(p) for p in (0.7, 0.2, 0.1)), rel=1e-5)


def test_kl_estimators_on_known_values():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    # k3 = exp(ref - logp) - (ref - logp) - 1
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1], rel=1e-6
    )
    assert torch.all(kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_gae_with_gamma_and_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([2.5, 1.8, 1.9])
    assert ret[0].tolist() == pytest.approx([3.0, 2.0, 2.0])


def test_gae_by_hand_with_discount_and_a_short_row():
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[0.0, 1.0, 5.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.3, 0.6, 0.2], [0.4, 0.1, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: deltas d2 = 5 - 0.2, d1 = 1 + 0.9*0.2 - 0.6, d0 = 0 + 0.9*0.6 - 0.3
    d2, d1, d0 = 4.8, 0.58, 0.24
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    # row 1 ends after two tokens: the masked third token (99s) must not leak in
    e1 = 2.0 - 0.1
    e0 = 1.0 + gamma * 0.1 - 0.4
    assert adv[1].tolist() == pytest.approx([e0 + gamma * lam * e1, e1, 0.0])
    assert ret[1].tolist() == pytest.approx([e0 + gamma * lam * e1 + 0.4, e1 + 0.1, 0.0])


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased: sqrt(1/3)
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]  # one reward for all: no signal
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)


def test_clipped_policy_loss_clips_only_in_the_profitable_direction():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1]))  # ratios 1.5, 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clip_frac, _ = clipped_policy_loss(logp, old, adv, torch.ones(4), clip=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); A<0, r=1.5: max(1.5, 1.2) = 1.5 (not clipped)
    # A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped); A>0, r=1.1 inside the range: -2.2
    assert loss.tolist() == pytest.approx([-1.2, 1.5, 0.8, -2.2], rel=1e-6)
    assert clip_frac.item() == pytest.approx(0.5)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    loss, frac = clipped_value_loss(values, old, returns, torch.ones(2), clip=0.5)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 2.25; token 1: both 1
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.5])
    white = masked_whiten(x, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(white**2, mask).item() == pytest.approx(1.0, rel=1e-4)
    assert white[:, 2].tolist() == [0.0, 0.0]


def test_adaptive_kl_moves_towards_the_target_and_fixed_stays():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(2.0, samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(0.9, samples=10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert AdaptiveKLController(0.1).update(50.0, samples=10) == 0.1
