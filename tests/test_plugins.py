import re
from pathlib import Path

import pytest
import torch

from gossipfl.algorithms.attacks import AttackInput, resolve_attack
from gossipfl.algorithms.merge import weighted_mean
from gossipfl.algorithms.plugins import load_callable
from gossipfl.algorithms.robust import FilterContext, FilterInput, resolve_filter

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def guide_examples():
    """The Python blocks of the guide's section on user filters and attacks: the test runs them."""
    section = GUIDE.read_text().split("## Byzantine robustness: your own filter or attack")[1].split("\n## ")[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


USER_MODULE = guide_examples() + '''

def wrong_shape(batch):
    return FilterOutput(batch.received, batch.weights[:, :1], batch.weights[:, 1:])

def two_arguments(batch, extra):
    return batch

def takes_defaults(batch, scale=2.0):
    return batch.own * scale

class Stateful:
    def __call__(self, batch):
        return batch.own

instance = Stateful()
not_callable = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text(USER_MODULE)
    (tmp_path / "broken_rules.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rules"


def test_a_user_supplied_filter_runs_through_resolve_filter(user_module):
    rule = resolve_filter(f"{user_module}:nearest_only", 2, FilterContext())
    own = torch.zeros(2, 3)
    received = [torch.full((2, 3), 5.0), torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.0, 0.25]], dtype=torch.float64)
    out = rule(FilterInput(torch.arange(2), own, received, weights))
    result = weighted_mean(own, out.received, out.weights, torch.empty_like(own))
    torch.testing.assert_close(result, torch.tensor([[0.5] * 3, [1.0] * 3]))  # half-way to 1, and to 2
    assert out.suspicion.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def test_a_user_filter_that_breaks_the_interface_gets_a_clear_message(user_module):
    rule = resolve_filter(f"{user_module}:wrong_shape", 1, FilterContext())
    with pytest.raises(ValueError, match="wrong_shape.*expected"):
        rule(FilterInput(torch.zeros(1, dtype=torch.long), torch.zeros(1, 2), [torch.ones(1, 2)],
                         torch.tensor([[0.5, 0.5]], dtype=torch.float64)))


def test_a_user_supplied_attack_runs_through_resolve_attack(user_module):
    attack = resolve_attack(f"{user_module}:push_away")
    assert not attack.trains and attack.label_map is None
    v = torch.tensor([[1.0, 1.0]])
    batch = AttackInput(round=0, step=0, attackers=torch.tensor([3]), receivers=torch.tensor([0]), own=v,
                        round_start=v, target=v, honest_mean=torch.tensor([[2.0, 0.0]]), honest_std=v * 0,
                        honest_weight=torch.tensor([0.5]), byzantine_weight=torch.tensor([0.5]),
                        honest_count=torch.tensor([1]))
    assert attack(batch).tolist() == [[-9.0, 11.0]]
    shaped = resolve_attack(f"{user_module}:instance")
    assert torch.equal(shaped(batch), v)


@pytest.mark.parametrize("text, problem", [
    ("my_rules", "expected 'package.module:function'"),
    ("my_rules:", "expected 'package.module:function'"),
    (":nearest_only", "expected 'package.module:function'"),
    ("my rules:f", "expected 'package.module:function'"),
    ("my_rules:1f", "expected 'package.module:function'"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("my_rules.sub:f", "no module named 'my_rules.sub'"),
    ("needs_missing:f", "importing 'needs_missing' failed: No module named 'no_such_dependency_xyz'"),
    ("broken_rules:f", "importing 'broken_rules' failed: RuntimeError: boom"),
    ("my_rules:missing", "has no attribute 'missing'"),
    ("my_rules:not_callable", "is a int, not a function"),
    ("my_rules:two_arguments", r"exactly one positional argument .* \(batch, extra\)"),
    ("my_rules:Stateful", r"exactly one positional argument"),
])
def test_bad_names_and_signatures_are_refused_naming_the_text_and_the_problem(user_module, text, problem):
    with pytest.raises(ValueError, match=problem) as e:
        load_callable(text, "filter")
    assert str(e.value).startswith(f"filter {text!r}")


def test_signatures_that_can_take_one_positional_argument_are_accepted(user_module):
    assert load_callable("my_rules:takes_defaults", "attack")(type("B", (), {"own": 2.0})) == 4.0
    assert load_callable("my_rules:instance", "attack") is not None
    assert load_callable("builtins:len", "filter") is len


def test_user_rules_take_no_parameters(user_module):
    with pytest.raises(ValueError, match="takes no parameters"):
        resolve_filter("my_rules:nearest_only", 1, FilterContext(), k=2)
    with pytest.raises(ValueError, match="takes no parameters"):
        resolve_attack("my_rules:push_away", scale=2)
