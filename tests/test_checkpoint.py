import pytest
import torch

from gossipfl import checkpoint


def test_save_and_load_latest_keeps_the_newest_two(tmp_path):
    for r in range(5):
        checkpoint.save(tmp_path, r, torch.full((10,), float(r)), "abc")
    assert len(list(tmp_path.glob("checkpoint-*.npy"))) == 2
    saved = checkpoint.load_latest(tmp_path, "abc")
    assert saved.round == 4 and torch.equal(saved.vector, torch.full((10,), 4.0))


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    checkpoint.save(tmp_path, 1, torch.ones(4), "abc")
    newest = checkpoint.save(tmp_path, 2, torch.ones(4) * 2, "abc")
    newest.with_suffix(".npy").write_bytes(b"\x93NUMPY garbage")
    assert checkpoint.load_latest(tmp_path, "abc").round == 1


def test_other_layout_is_refused_and_nothing_is_none(tmp_path):
    assert checkpoint.load_latest(tmp_path, "abc") is None
    checkpoint.save(tmp_path, 0, torch.ones(4), "abc")
    with pytest.raises(ValueError, match="another model layout"):
        checkpoint.load_latest(tmp_path, "xyz")


def test_a_pickled_array_is_never_loaded(tmp_path):
    import numpy as np
    checkpoint.save(tmp_path, 0, torch.ones(4), "abc")
    path = next(tmp_path.glob("checkpoint-*.npy"))
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert checkpoint.load_latest(tmp_path, "abc") is None  # object arrays refused, not unpickled
