"""The graph side: topologies, mixing matrices and their optimisation, Poisson edge clocks.

Torch-free, so the CLI can inspect graphs and weights without importing torch."""
