import statistics

import pytest
import torch

from gossipfl.algorithms.attacks import (ATTACKS, AttackContext, AttackInput, alie_z, flip_labels,
                                         resolve_attack)
from gossipfl.algorithms.merge import weighted_mean


def pairs(**fields):
    """Two (attacker, receiver) pairs of 3-coordinate vectors; fields override the defaults."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731
    base = dict(
        round=4, step=1, attackers=torch.tensor([7, 7]), receivers=torch.tensor([1, 2]),
        own=t([[2.0, 0.0, 1.0], [2.0, 0.0, 1.0]]), round_start=t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
        target=t([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), honest_mean=t([[1.0, 2.0, 3.0], [3.0, 5.0, 1.0]]),
        honest_std=t([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]]),
        honest_weight=torch.tensor([0.6, 0.5], dtype=torch.float64),
        byzantine_weight=torch.tensor([0.2, 0.25], dtype=torch.float64),
        honest_count=torch.tensor([3, 2]), seed=5)
    base.update(fields)
    return AttackInput(**base)


def sent(name, batch=None, **params):
    return resolve_attack(name, AttackContext(nodes=50, attackers=12), **params)(batch or pairs())


def test_sign_flip_reverses_the_round_update():
    # update own - round_start = (1, -1, 0)
    assert sent("sign_flip").tolist()[0] == [0.0, 2.0, 1.0]
    assert sent("sign_flip", scale=2.0).tolist()[0] == [-1.0, 3.0, 1.0]


def test_label_flip_maps_labels_and_sends_the_poisoned_model_scaled():
    assert flip_labels(torch.tensor([0, 1, 2, 9]), 10).tolist() == [9, 8, 7, 0]
    spec = ATTACKS["label_flip"]
    assert spec.trains and spec.label_map is flip_labels
    assert torch.equal(sent("label_flip"), pairs().own)  # scale 1: the model trained on flipped labels
    assert sent("label_flip", scale=3.0).tolist()[0] == [4.0, -2.0, 1.0]  # 1 + 3 * (1, -1, 0)


def test_a_little_is_enough_sends_mean_minus_z_std():
    assert sent("alie", z=1.5).tolist() == [[-0.5, 2.0, 0.0], [2.25, 4.25, 0.25]]
    # z_max for n = 50, f = 12: s = floor(26) - 12 = 14 supporters, Phi^-1((38 - 14) / 38)
    z = statistics.NormalDist().inv_cdf(24 / 38)
    assert alie_z(50, 12) == pytest.approx(z) and z == pytest.approx(0.336, abs=1e-3)
    torch.testing.assert_close(sent("alie"), pairs().honest_mean - z * pairs().honest_std)


def test_a_little_is_enough_refuses_counts_without_a_finite_z():
    with pytest.raises(ValueError, match="attackers"):
        resolve_attack("alie", AttackContext(nodes=10, attackers=0))
    with pytest.raises(ValueError, match="set z"):
        resolve_attack("alie", AttackContext(nodes=4, attackers=3))
    assert resolve_attack("alie", AttackContext(), z=1.0) is not None


def test_inner_product_manipulation_sends_minus_epsilon_times_the_honest_pull():
    # receiver 1 sits at 0 and its honest neighbours average (1, 2, 3)
    assert sent("ipm", epsilon=0.5).tolist()[0] == [-0.5, -1.0, -1.5]


def test_inner_product_manipulation_reverses_plain_gossip_once_epsilon_beats_the_weight_ratio():
    batch = pairs()
    for epsilon, backwards in ((2.0, False), (4.0, True)):  # honest / byzantine weight = 0.6 / 0.2 = 3
        x = sent("ipm", epsilon=epsilon)[:1]
        own = batch.target[:1]
        new = weighted_mean(own, [batch.honest_mean[:1], x], torch.tensor([[0.2, 0.6, 0.2]], dtype=torch.float64),
                            torch.empty_like(own))
        pull = float(((new - own) * (batch.honest_mean[:1] - own)).sum())
        assert (pull < 0) == backwards


def test_dissensus_cancels_each_receivers_honest_pull():
    # receiver 2 at (1, 1, 1): honest mean (3, 5, 1), honest weight 0.5, byzantine 0.25:
    # (1, 1, 1) - 0.5 * (2, 4, 0) / 0.25 = (-3, -7, 1)
    assert sent("dissensus").tolist()[1] == [-3.0, -7.0, 1.0]
    assert sent("dissensus", epsilon=0.5).tolist()[1] == [-1.0, -3.0, 1.0]
    # under plain gossip (own weight 0.25) receiver 2 does not move at all
    batch = pairs()
    own = batch.target[1:]
    new = weighted_mean(own, [batch.honest_mean[1:], sent("dissensus")[1:]],
                        torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64), torch.empty_like(own))
    torch.testing.assert_close(new, own)


def test_attacks_that_need_honest_neighbours_send_the_target_without_them():
    batch = pairs(honest_count=torch.tensor([0, 2]), honest_weight=torch.tensor([0.0, 0.5], dtype=torch.float64))
    for name in ("alie", "ipm", "dissensus"):
        out = resolve_attack(name, AttackContext(50, 12))(batch)
        assert torch.equal(out[0], batch.target[0]), name
        assert not torch.equal(out[1], batch.target[1]), name


def test_free_rider_does_not_train_and_resends_its_stale_model():
    assert not ATTACKS["free_rider"].trains and ATTACKS["free_rider"].label_map is None
    attack = resolve_attack("free_rider")
    assert not attack.trains and torch.equal(attack(pairs()), pairs().round_start)


def test_gaussian_noise_is_one_seeded_draw_per_attacker_whatever_the_batch():
    d = 20_000
    own = torch.randn(1, d).repeat(3, 1)  # the same vector in every pair: the noise alone differs
    batch = pairs(attackers=torch.tensor([7, 7, 9]), receivers=torch.tensor([1, 2, 1]), own=own,
                  round_start=own, target=own, honest_mean=own, honest_std=own,
                  honest_weight=torch.ones(3), byzantine_weight=torch.ones(3), honest_count=torch.ones(3))
    out = sent("gaussian", batch, sigma=0.5)
    noise = out - own
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    assert float(noise[0].std()) == pytest.approx(0.5, rel=0.05) and abs(float(noise[0].mean())) < 0.02
    alone = AttackInput(**{**batch.__dict__, **{k: getattr(batch, k)[2:] for k in (
        "attackers", "receivers", "own", "round_start", "target", "honest_mean", "honest_std",
        "honest_weight", "byzantine_weight", "honest_count")}})
    assert torch.equal(sent("gaussian", alone, sigma=0.5)[0], out[2])  # the same draw in a batch of one
    assert torch.equal(sent("gaussian", batch, sigma=0.5), out)
    later = AttackInput(**{**batch.__dict__, "round": 5})
    assert not torch.equal(sent("gaussian", later, sigma=0.5), out)
    assert torch.equal(sent("gaussian", batch, sigma=0.0), own)


def test_every_attack_returns_one_vector_per_pair_and_leaves_its_inputs_alone():
    batch = pairs()
    before = {k: v.clone() for k, v in batch.__dict__.items() if isinstance(v, torch.Tensor)}
    for name in ATTACKS:
        out = resolve_attack(name, AttackContext(50, 12))(batch)
        assert out.shape == batch.own.shape and torch.isfinite(out).all(), name
    assert all(torch.equal(getattr(batch, k), v) for k, v in before.items())


def test_unknown_attacks_and_parameters_are_refused():
    with pytest.raises(ValueError, match="choose one of"):
        resolve_attack("sign-flip")
    with pytest.raises(ValueError, match="no parameter 'sigma'"):
        resolve_attack("sign_flip", sigma=1.0)
    with pytest.raises(ValueError, match="gaussian.sigma"):
        resolve_attack("gaussian", sigma=-1.0)
