import copy

import pytest
import torch
import torch.nn.functional as F

from gossipfl import models
from gossipfl.algorithms.train import (LocalTraining, StackedBatch, StackedGradient, learning_rate, local_batches,
                                       module_gradient, sam_perturbation)
from gossipfl.config import TrainConfig
from gossipfl.params import FlatModel, StackedModule


def config(rho, steps=6):
    return TrainConfig(local_steps=steps, batch_size=16, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=rho)


def node(rho, steps=6, seed=0):
    """One node's model, data and optimiser, as a Node holds them, plus an untouched copy of its module."""
    torch.manual_seed(seed)
    net = models.build("cnn", (1, 8, 8), 5, width=4)
    x, y = torch.randn(90, 1, 8, 8), torch.randint(0, 5, (90,))
    reference = copy.deepcopy(net)
    flat = FlatModel(net)
    training = LocalTraining(flat.params.view(1, -1), flat.grad.view(1, -1), config(rho, steps))
    batches = local_batches(7, 2, 0, len(y), steps, 16)
    return flat, training, batches, module_gradient(flat, x, y), reference, x, y


def dfedavg_with_torch_sgd(reference, batches, x, y, **variant):
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **variant)
    for idx in batches:
        opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()


def test_rho_zero_is_bit_identical_to_dfedavg_with_torch_sgd():
    """Bit for bit against torch.optim.SGD(fused=True), the one-pass kernel every runtime uses; the
    unfused variants round d = g + wd x and m = mu m + d separately and differ by an ulp here and there."""
    flat, training, batches, gradient, reference, x, y = node(rho=0.0)
    training.run(batches, gradient, lr=0.1)
    unfused = copy.deepcopy(reference)
    dfedavg_with_torch_sgd(reference, batches, x, y, fused=True)
    dfedavg_with_torch_sgd(unfused, batches, x, y, foreach=False)
    for ours, fused, plain in zip(flat.module.parameters(), reference.parameters(), unfused.parameters()):
        assert torch.equal(ours, fused)
        torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-7)


def test_a_new_round_starts_a_fresh_optimiser():
    flat, training, batches, gradient, reference, x, y = node(rho=0.0, steps=3)
    training.run(batches, gradient, lr=0.1)
    training.run(batches, gradient, lr=0.1)
    for _ in range(2):
        dfedavg_with_torch_sgd(reference, batches, x, y, fused=True)
    for ours, theirs in zip(flat.module.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


def test_sam_step_matches_a_per_tensor_reference():
    rho = 0.05
    flat, training, batches, gradient, reference, x, y = node(rho=rho, steps=4)
    training.run(batches, gradient, lr=0.1)
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
    for ours, theirs in zip(flat.module.parameters(), params):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_sam_changes_the_trajectory_and_differs_from_sgd():
    sam, sam_training, batches, sam_gradient, *_ = node(rho=0.05)
    sgd, sgd_training, _, sgd_gradient, *_ = node(rho=0.0)
    sam_training.run(batches, sam_gradient, 0.1)
    sgd_training.run(batches, sgd_gradient, 0.1)
    assert not torch.equal(sam.vector, sgd.vector)


def test_sam_perturbation_has_norm_rho_per_row():
    g = torch.randn(3, 1000) * torch.tensor([[0.1], [1.0], [10.0]])
    for rho in (0.01, 0.05, 0.5):
        e = g * sam_perturbation(g, rho)
        torch.testing.assert_close(e.norm(dim=1), torch.full((3,), rho), rtol=1e-5, atol=0)
    assert float((torch.zeros(2, 10) * sam_perturbation(torch.zeros(2, 10), 0.05)).abs().sum()) == 0


def test_batches_are_seeded_per_round_and_cover_local_data():
    batches = lambda r: local_batches(7, 2, r, 90, 6, 16)  # noqa: E731  6 x 16 = 96 draws from 90 samples
    assert torch.equal(batches(3), batches(3))
    assert not torch.equal(batches(3), batches(4))
    first = batches(0).reshape(-1)[:90]
    assert sorted(first.tolist()) == list(range(90))  # one whole shuffle before any repeat
    assert local_batches(7, 2, 0, 10, 3, 16).shape == (3, 10)  # a batch never exceeds the local data


def test_learning_rate_decays_per_round():
    cfg = TrainConfig(lr=0.1, lr_decay=0.5)
    assert learning_rate(cfg, 0) == 0.1 and learning_rate(cfg, 3) == pytest.approx(0.0125)


def stacked_nodes(b, rho, mask=None):
    """b models of one architecture as the rows of one matrix, and b separate copies of them."""
    flats = []
    for seed in range(b):
        torch.manual_seed(seed)
        flats.append(FlatModel(models.build("mlp", (1, 8, 8), 5, hidden=[12])))
    layout = flats[0].layout
    matrix = torch.stack([f.vector for f in flats])
    grad = torch.zeros(b, layout.n_trainable)
    stacked = StackedGradient(StackedModule(flats[0].module, layout), layout, matrix, grad)
    return flats, matrix, grad, stacked


def test_stacked_gradient_equals_each_models_own_gradient():
    flats, matrix, grad, stacked = stacked_nodes(4, rho=0.0)
    x, y = torch.randn(4, 10, 1, 8, 8), torch.randint(0, 5, (4, 10))
    mask = torch.ones(4, 10)
    mask[2, 6:] = 0  # node 2 holds only six samples
    losses = stacked(StackedBatch(x, y, mask))
    for b, flat in enumerate(flats):
        real = int(mask[b].sum())
        loss = module_gradient(flat, x[b], y[b])(torch.arange(real))
        torch.testing.assert_close(grad[b], flat.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(losses[b], loss[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_training_all_rows_at_once_equals_training_each_node(rho):
    flats, matrix, grad, stacked = stacked_nodes(3, rho)
    cfg = config(rho, steps=3)
    x, y = torch.randn(3, 30, 1, 8, 8), torch.randint(0, 5, (3, 30))
    batch_index = [local_batches(0, i, 0, 30, 3, 8) for i in range(3)]
    batches = [StackedBatch(torch.stack([x[i, batch_index[i][s]] for i in range(3)]),
                            torch.stack([y[i, batch_index[i][s]] for i in range(3)]), None) for s in range(3)]
    together = LocalTraining(matrix[:, :flats[0].layout.n_trainable], grad, cfg).run(batches, stacked, 0.1)
    for i, flat in enumerate(flats):
        alone = LocalTraining(flat.params.view(1, -1), flat.grad.view(1, -1), cfg)
        loss = alone.run(batch_index[i], module_gradient(flat, x[i], y[i]), 0.1)
        torch.testing.assert_close(matrix[i], flat.vector, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together[i], loss[0], rtol=1e-5, atol=1e-6)
