"""In-process runtimes: many nodes in one Python process."""

from .engine import Simulation

__all__ = ["Simulation"]
