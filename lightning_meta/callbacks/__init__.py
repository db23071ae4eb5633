"""Lightning callbacks of lightning-meta."""

from lightning_meta.callbacks.budget import StepBudget, cosine_to_fraction
from lightning_meta.callbacks.learned_optimizer import LearnedOptimizer

__all__ = ["LearnedOptimizer", "StepBudget", "cosine_to_fraction"]
