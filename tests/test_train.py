import copy

import pytest
import torch
import torch.nn.functional as F

from gossipfl import models
from gossipfl.config import TrainConfig
from gossipfl.params import FlatModel
from gossipfl.algorithms.train import LocalTrainer, sam_perturbation


def setup(rho, steps=6, seed=0):
    torch.manual_seed(seed)
    net = models.build("cnn", (1, 8, 8), 5, width=4)
    x, y = torch.randn(90, 1, 8, 8), torch.randint(0, 5, (90,))
    cfg = TrainConfig(local_steps=steps, batch_size=16, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=rho)
    reference = copy.deepcopy(net)
    flat = FlatModel(net)
    return LocalTrainer(flat, x, y, cfg, seed=7, node=2), reference, x, y


@pytest.mark.parametrize("foreach", [False, True])
def test_rho_zero_is_bit_identical_to_dfedavg_with_torch_sgd(foreach):
    trainer, reference, x, y = setup(rho=0.0)
    batches = trainer.batches(0)
    trainer.run_round(0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=foreach)
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()
    for ours, theirs in zip(trainer.flat.module.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_sam_step_matches_a_per_tensor_reference():
    rho = 0.05
    trainer, reference, x, y = setup(rho=rho, steps=4)
    batches = trainer.batches(0)
    trainer.run_round(0)
    params = list(reference.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    for step, idx in enumerate(batches):
        grads = torch.autograd.grad(F.cross_entropy(reference(x[idx]), y[idx]), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        with torch.no_grad():
            eps = [rho * g / norm for g in grads]
            for p, e in zip(params, eps):
                p.add_(e)
        grads = torch.autograd.grad(F.cross_entropy(reference(x[idx]), y[idx]), params)
        with torch.no_grad():
            for p, e, g, m in zip(params, eps, grads, momentum):
                p.sub_(e)
                d = g + 5e-4 * p
                m.copy_(d if step == 0 else 0.9 * m + d)
                p.add_(m, alpha=-0.1)
    for ours, theirs in zip(trainer.flat.module.parameters(), params):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_sam_changes_the_trajectory_and_differs_from_sgd():
    sam, _, _, _ = setup(rho=0.05)
    sgd, _, _, _ = setup(rho=0.0)
    sam.run_round(0)
    sgd.run_round(0)
    assert not torch.equal(sam.flat.vector, sgd.flat.vector)


def test_sam_perturbation_has_norm_rho():
    g = torch.randn(1000)
    for rho in (0.01, 0.05, 0.5):
        assert float(sam_perturbation(g, rho).norm()) == pytest.approx(rho, rel=1e-5)
    assert float(sam_perturbation(torch.zeros(10), 0.05).abs().sum()) == 0


def test_batches_are_seeded_per_round_and_cover_local_data():
    trainer, _, _, _ = setup(rho=0.0, steps=6)  # 6 x 16 = 96 draws from 90 samples
    assert torch.equal(trainer.batches(3), trainer.batches(3))
    assert not torch.equal(trainer.batches(3), trainer.batches(4))
    first = trainer.batches(0).reshape(-1)[:90]
    assert sorted(first.tolist()) == list(range(90))  # one whole shuffle before any repeat


def test_learning_rate_decays_per_round():
    trainer, _, _, _ = setup(rho=0.0)
    trainer.cfg.lr_decay = 0.5
    assert trainer.lr(0) == 0.1 and trainer.lr(3) == pytest.approx(0.0125)
