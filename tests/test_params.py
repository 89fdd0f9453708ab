import torch
import torch.nn.functional as F
from torch import nn

from gossipfl import models
from gossipfl.params import FlatModel


def bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


def test_parameters_gradients_and_buffers_are_views_of_the_flat_vectors():
    torch.manual_seed(0)
    net = bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flat = FlatModel(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by flattening"
    assert flat.layout.size == flat.vector.numel() == sum(
        p.numel() for p in net.parameters()) + 8  # running mean and var of 4 channels
    assert [e.kind for e in flat.layout.entries] == ["param", "param", "norm", "norm", "param", "param",
                                                     "buffer", "buffer"]
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(net(x), y).backward()
    assert torch.equal(flat.grad, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert flat.grad.abs().sum() > 0
    running = net[1].running_mean.clone()
    assert not torch.equal(running, before["1.running_mean"])  # the forward updated it in place...
    bn = flat.layout.entries[6]
    assert torch.equal(flat.vector[bn.offset:bn.offset + bn.numel], running)  # ...inside the flat vector
    flat.params.zero_()
    assert all(p.abs().sum() == 0 for p in net.parameters())


def test_load_copies_in_place_and_layout_digest_tells_models_apart():
    a = FlatModel(models.build("mlp", (1, 8, 8), 10, hidden=[16]))
    b = FlatModel(models.build("mlp", (1, 8, 8), 10, hidden=[16]))
    c = FlatModel(models.build("mlp", (1, 8, 8), 10, hidden=[17]))
    assert a.layout.digest() == b.layout.digest() != c.layout.digest()
    ptr = a.vector.data_ptr()
    a.load(b.vector)
    assert a.vector.data_ptr() == ptr and torch.equal(a.vector, b.vector)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(a.module(x), b.module(x))


def test_every_zoo_model_flattens_and_runs():
    for name in ("mlp", "cnn", "resnet", "logistic"):
        flat = FlatModel(models.build(name, (1, 28, 28), 10, hidden=[8], width=8))
        out = flat.module(torch.randn(2, 1, 28, 28))
        assert out.shape == (2, 10)
        assert flat.layout.n_trainable == sum(p.numel() for p in flat.module.parameters())
