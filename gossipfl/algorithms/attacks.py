"""Attacks: what a Byzantine node sends instead of its honest vector, for evaluating filters.

An attack maps an AttackInput, P (attacker, receiver) pairs at once, to the P vectors sent, one
per pair, so that an attack aimed at each receiver's consensus step (dissensus) can send every
neighbour a different vector. The runtime builds the input: in simulation from global state
(omniscient, the hardest case), in an attacker process from what it received. Results may share
memory with the inputs; nothing here writes into them.

`ATTACKS` names the built-ins for the config, with each one's parameters, whether the attacker
trains (`trains`) and the label map its training data goes through (`label_map`, data poisoning);
`resolve_attack` builds a built-in or a user's `package.module:function`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..seeding import ATTACK_STREAM, round_seed
from .plugins import Parameter, construct, is_plugin_name, load_callable, parameter_table



@dataclass(frozen=True)
class AttackInput:
    """P (attacker, receiver) pairs of one exchange (round, step). Vectors are (P, d):
    own: the attacker's current vector (what it would send if honest);
    round_start: the attacker's vector before this round's local training;
    target: the receiver's current vector;
    honest_mean: the mean of the vectors the receiver gets from its honest neighbours, weighted by
        the receiver's mixing weights (itself excluded); honest_std: their coordinate-wise standard
        deviation (same weights). Where the receiver has no honest neighbour (honest_count 0) both
        are ignored and attacks that need them send `target`;
    honest_weight, byzantine_weight (P,): the receiver's total mixing weight on its honest and on
        its Byzantine neighbours; honest_count (P,): how many honest neighbours it has;
    seed: the experiment seed; random attacks draw from (seed, attacker, round, step), so every
        runtime draws alike however it batches the pairs."""
    round: int
    step: int
    attackers: torch.Tensor
    receivers: torch.Tensor
    own: torch.Tensor
    round_start: torch.Tensor
    target: torch.Tensor
    honest_mean: torch.Tensor
    honest_std: torch.Tensor
    honest_weight: torch.Tensor
    byzantine_weight: torch.Tensor
    honest_count: torch.Tensor
    seed: int = 0


def pair_inputs(round_index: int, step: int, seed: int, receivers: torch.Tensor, target: torch.Tensor,
                received: Sequence[torch.Tensor], weights: torch.Tensor, senders: torch.Tensor,
                byzantine: torch.Tensor, round_start: Callable[[int], torch.Tensor]) -> tuple[AttackInput, torch.Tensor]:
    """The AttackInput of every (Byzantine sender, receiver) pair among B receivers, and where
    each pair's vector goes: (P, 2) (receiver row b, slot k).

    `target` (B, d) are the receivers' vectors; `received` K tensors of (B, d) what each slot's
    sender would send honestly (a Byzantine slot: the attacker's own vector); `weights` (B, K + 1)
    the receivers' mixing weights (0 for an absent slot); `senders` (B, K) the slots' node ids;
    `byzantine` (B, K) which slots are attackers; `round_start(attacker)` that attacker's vector
    before the round's training, (d,). Every runtime builds its
    pairs here: simulations from every node's current vector (omniscient), an attacker process from
    what it received."""
    w = weights[:, 1:].to(target.device, torch.float64)
    present = w > 0
    byzantine = byzantine.to(target.device) & present
    honest = present & ~byzantine
    hw = torch.where(honest, w, 0.0)
    honest_weight = hw.sum(dim=1)
    share = (hw / honest_weight.clamp_min(1e-300)[:, None]).to(target.dtype)
    mean = sum(share[:, k:k + 1] * x for k, x in enumerate(received)) if received else torch.zeros_like(target)
    var = sum(share[:, k:k + 1] * (x - mean) ** 2 for k, x in enumerate(received)) if received else mean
    slots = byzantine.nonzero()
    b, k = slots[:, 0], slots[:, 1]
    attackers = senders.to(target.device)[b, k]
    stack = lambda rows: torch.stack(rows) if rows else target[:0]  # noqa: E731
    batch = AttackInput(
        round=round_index, step=step, attackers=attackers, receivers=receivers.to(target.device)[b],
        own=stack([received[j][i] for i, j in slots.tolist()]),
        round_start=stack([round_start(a) for a in attackers.tolist()]), target=target[b], honest_mean=mean[b],
        honest_std=var.clamp_min(0).sqrt()[b], honest_weight=honest_weight[b],
        byzantine_weight=torch.where(byzantine, w, 0.0).sum(dim=1)[b], honest_count=honest.sum(dim=1)[b], seed=seed)
    return batch, slots


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(P,) per-pair values as a (P, 1) column in `like`'s device and dtype."""
    return values.to(like.device, like.dtype)[:, None]


def _where_honest(batch: AttackInput, sent: torch.Tensor) -> torch.Tensor:
    """`sent` for pairs whose receiver has honest neighbours, `target` for the others."""
    return torch.where((batch.honest_count > 0).to(sent.device)[:, None], sent, batch.target)


def _towards_honest(batch: AttackInput, factor: torch.Tensor) -> torch.Tensor:
    """target + factor * (honest_mean - target) per pair, and target where nothing is honest."""
    return _where_honest(batch, torch.lerp(batch.target, batch.honest_mean, _column(factor, batch.target)))


class SignFlip:
    """Send the attacker's round update reversed and scaled: round_start - scale * (own -
    round_start). The gradient sign flip carried to model exchange: flipping the whole model
    (-own, the reference code's bit flip) is a jump any distance check sees at once; flipping the
    update keeps the message as close to the honest models as the honest update is."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        return torch.lerp(batch.round_start, batch.own, -self.scale)


class GaussianNoise:
    """Send own + N(0, sigma^2) per coordinate. One noise vector per attacker and exchange, drawn
    on the CPU from (seed, attacker, round, step): every receiver of an attacker gets the same
    noisy model (a broadcast), and every runtime and device the same draw."""

    def __init__(self, sigma: float = 1.0):
        if sigma < 0:
            raise ValueError(f"gaussian.sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        attackers, index = torch.unique(batch.attackers.cpu(), return_inverse=True)
        d = batch.own.shape[1]
        noise = torch.stack([
            torch.randn(d, generator=torch.Generator().manual_seed(
                round_seed(batch.seed, ATTACK_STREAM, int(a), batch.round, batch.step)))
            for a in attackers.tolist()]) if len(attackers) else torch.empty(0, d)
        return batch.own + self.sigma * noise[index].to(batch.own.device, batch.own.dtype)


def flip_labels(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Label flipping: y -> C - 1 - y, applied by the runtime to an attacker's training labels."""
    return classes - 1 - labels


class LabelFlip:
    """Data poisoning: the attacker trains on flipped labels (`flip_labels`) and sends round_start +
    scale * (own - round_start); scale 1 is the plainly poisoned model, a larger scale boosts it."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        return torch.lerp(batch.round_start, batch.own, self.scale)


def alie_z(n: int, f: int) -> float:
    """A Little Is Enough's z_max (Baruch et al. 2019) for n workers of which f are Byzantine: with
    s = floor(n / 2 + 1) - f honest "supporters" needed, z = Phi^-1((n - f - s) / (n - f))."""
    if not 0 < f < n:
        raise ValueError(f"alie's z_max needs 0 < attackers < nodes, got {f} of {n}; or set z")
    s = math.floor(n / 2 + 1) - f
    share = (n - f - s) / (n - f)
    if not 0 < share < 1:
        raise ValueError(f"alie: n = {n}, f = {f} give no finite z (the attackers need no supporters); set z")
    return statistics.NormalDist().inv_cdf(share)


class ALittleIsEnough:
    """A Little Is Enough (Baruch et al. 2019): send honest_mean - z * honest_std, inside the spread
    of the honest vectors so that distance and coordinate-wise rules let it through, coordinated
    across attackers. z is `z`, or the paper's z_max with the network's `nodes` as its n workers
    and its `attackers` as f (as the ClippedGossip authors' code takes them); the mean and std
    are over each receiver's honest neighbours, as there."""

    def __init__(self, nodes: int = 0, attackers: int = 0, z: float | None = None):
        self.z = alie_z(nodes, attackers) if z is None else z

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        return _where_honest(batch, batch.honest_mean - self.z * batch.honest_std)


class InnerProductManipulation:
    """Inner-product manipulation (Xie et al. 2020) carried to model exchange. On gradients the
    attackers send -epsilon times the honest mean, so the aggregate's inner product with the true
    gradient turns negative once epsilon is large enough. A receiver's honest "gradient" here is
    its honest neighbours' pull, honest_mean - target, so the attacker sends target - epsilon *
    (honest_mean - target): plain gossip then moves the receiver by (honest_weight - epsilon *
    byzantine_weight) * (honest_mean - target), backwards once epsilon > honest_weight /
    byzantine_weight. (The reference code's -epsilon * mean of the models is a far jump in model
    space, not a small reversed step.)"""

    def __init__(self, epsilon: float = 0.1):
        self.epsilon = epsilon

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        return _towards_honest(batch, torch.full_like(batch.honest_weight, -self.epsilon, dtype=torch.float64))


class Dissensus:
    """The dissensus attack of He, Karimireddy, Jaggi (2022), aimed at each receiver's consensus
    step: to receiver i, x_i - epsilon * sum over i's honest neighbours j of W_ij (x_j - x_i) /
    byzantine weight = target - epsilon * honest_weight * (honest_mean - target) / byzantine_weight.
    Under plain gossip this cancels a share epsilon of the honest pull (epsilon = 1: i does not
    move); epsilon > 1 pushes the receivers apart."""

    def __init__(self, epsilon: float = 1.0):
        self.epsilon = epsilon

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        factor = -self.epsilon * batch.honest_weight.double() / batch.byzantine_weight.double()
        return _towards_honest(batch, factor)


class FreeRider:
    """Does not train (`trains` is False) and resends a stale model: its vector from before the
    round, round_start. It takes the others' models and contributes nothing."""

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        return batch.round_start


Send = Callable[[AttackInput], torch.Tensor]
LabelMap = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """A built-in attack: the class, the meaning of each parameter (defaults are the class's own),
    whether the attacker trains, and the label map the runtime applies to its training labels."""
    rule: Callable[..., Send]
    meanings: Mapping[str, str]
    trains: bool = True
    label_map: LabelMap | None = None

    @property
    def parameters(self) -> dict[str, Parameter]:
        return parameter_table(self.rule, self.meanings, CONTEXT_ARGUMENTS)


@dataclass(frozen=True)
class AttackContext:
    """What a run knows that an attack may need: how many nodes the network has, how many attack."""
    nodes: int = 0
    attackers: int = 0


CONTEXT_ARGUMENTS = ("nodes", "attackers")


@dataclass(frozen=True)
class Attack:
    """A resolved attack as the runtime uses it: call it on an AttackInput; `trains` says whether
    the attacker trains at all, `label_map(labels, classes)` (or None) what it trains on."""
    name: str
    send: Send
    trains: bool = True
    label_map: LabelMap | None = None

    def __call__(self, batch: AttackInput) -> torch.Tensor:
        out = self.send(batch)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(batch.own.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"attack {self.name!r} returned {shape}, expected a tensor of {tuple(batch.own.shape)}")
        return out


ATTACKS: dict[str, AttackSpec] = {
    "sign_flip": AttackSpec(SignFlip, {"scale": "reversed update's length, in honest updates"}),
    "gaussian": AttackSpec(GaussianNoise, {"sigma": "standard deviation of the noise added per coordinate"}),
    "label_flip": AttackSpec(LabelFlip, {"scale": "update boost: 1 sends the model trained on flipped labels"},
                             label_map=flip_labels),
    "alie": AttackSpec(ALittleIsEnough, {"z": "fixed z; unset = the paper's z_max for the run's nodes and attackers"}),
    "ipm": AttackSpec(InnerProductManipulation, {"epsilon": "sends target - epsilon * (honest mean - target)"}),
    "dissensus": AttackSpec(Dissensus, {"epsilon": "share of each receiver's honest pull cancelled (> 1 reverses it)"}),
    "free_rider": AttackSpec(FreeRider, {}, trains=False),
}


def resolve_attack(name_or_path: str, context: AttackContext = AttackContext(), **params: Any) -> Attack:
    """The built-in attack `name` built with `params`, or the user's `package.module:function`
    (which takes an AttackInput and returns (P, d), and no parameters; attributes `trains` and
    `label_map` on the function, if present, say what the runtime does with its training)."""
    if is_plugin_name(name_or_path):
        if params:
            raise ValueError(f"attack {name_or_path!r}: a user-supplied attack takes no parameters, got {sorted(params)}")
        send = load_callable(name_or_path, "attack")
        trains, label_map = getattr(send, "trains", True), getattr(send, "label_map", None)
        if not isinstance(trains, bool) or not (label_map is None or callable(label_map)):
            raise ValueError(f"attack {name_or_path!r}: `trains` must be a bool and `label_map` a function or None")
        return Attack(name_or_path, send, trains, label_map)
    spec = ATTACKS.get(name_or_path)
    if spec is None:
        raise ValueError(f"attack {name_or_path!r}; choose one of {', '.join(ATTACKS)}, or give 'package.module:function'")
    provided = {"nodes": context.nodes, "attackers": context.attackers}
    send = construct("attack", name_or_path, spec.rule, spec.parameters, provided, params)
    return Attack(name_or_path, send, spec.trains, spec.label_map)
