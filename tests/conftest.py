import pytest
import torch

from gossipfl import config


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def small_config(tmp_path):
    """A seconds-long experiment on scikit-learn digits: 6 nodes, small MLP."""
    def make(**overrides):
        data = {
            "name": "test", "seed": 1, "rounds": 3, "output": str(tmp_path / "runs"),
            "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
            "topology": {"kind": "ring", "nodes": 6},
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"local_steps": 4, "batch_size": 16, "lr": 0.05, "rho": 0.05},
            "gossip": {"steps": 2},
        }
        for key, value in overrides.items():
            section, _, field = key.rpartition("__")
            (data.setdefault(section, {}) if section else data)[field] = value
        return config.from_dict(data)
    return make


@pytest.fixture
def processes():
    """A list to put started node processes in; all are stopped after the test, pass or fail."""
    from gossipfl.runtimes import stop_all
    procs = []
    yield procs
    stop_all(procs, grace=2.0)
