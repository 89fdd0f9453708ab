"""Every random choice flows from (experiment seed, node, round, stream), so any round of any node
replays alone and runtimes can be compared to float tolerance.

A stream is a reserved id in the node or round position that no graph or run reaches, so the
seeds it draws never collide with a node's training seeds.
"""

from __future__ import annotations

import numpy as np

INIT_ROUND = 2**31      # a "round" no run reaches: its seed draws initial weights
POISSON_STREAM = 2**31  # a "node" id no graph has: its seeds draw a round's Poisson firings
EVAL_STREAM = 2**31 + 1  # a "node" id no graph has: its seed draws the evaluated nodes and test examples
TIMING_STREAM = 2**31 + 2  # a "node" id no graph has: its seeds draw simulated compute times and latencies
FILTER_STREAM = 2**31 + 3  # a "node" id no graph has: its seeds draw Bristle's random picks
ATTACK_STREAM = 2**31 + 4  # a "node" id no graph has: its seeds draw the attackers' noise
PLACEMENT_STREAM = 2**31 + 5  # a "node" id no graph has: its seed places the attackers
VALIDATION_STREAM = 2**31 + 6  # a "node" id no graph has: its seed draws the nodes' validation splits
SAMPLE_STREAM = 2**31 + 7  # a "node" id no graph has: its seeds draw fedavg's samples and churn announcements


def round_seed(*parts: int) -> int:
    """A 63-bit seed derived from (experiment seed, node, round, ...): replayable from any round."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))
