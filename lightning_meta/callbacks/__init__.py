"""Lightning callbacks of lightning-meta."""

from lightning_meta.callbacks.learned_optimizer import LearnedOptimizer

__all__ = ["LearnedOptimizer"]
