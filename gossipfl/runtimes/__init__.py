"""Runtimes: how the algorithm core runs: many Nodes in one process, one node per OS process, a
launcher of node processes."""
