"""Poisson-clock gossip: every edge fires at its own rate; a firing edge's two ends average.

By superposition, the firings of all edges in a time window form one Poisson process of the total
rate, and each firing picks edge e with probability r_e / sum(r). Drawing the count and the edges
from one seeded generator makes a round's exchanges replayable in any runtime.
"""

from __future__ import annotations

import numpy as np


def firings(rates: np.ndarray, duration: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(times, edge indices) of the firings in [0, duration), in time order."""
    total = float(rates.sum())
    count = int(rng.poisson(total * duration))
    times = np.sort(rng.uniform(0.0, duration, count))
    return times, rng.choice(len(rates), size=count, p=rates / total)

