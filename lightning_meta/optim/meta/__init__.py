"""Meta-training of learned optimizers: task families, meta-gradient estimators and a LightningModule."""

from lightning_meta.optim.meta.estimators import (
    ES,
    PES,
    Estimate,
    GradientEstimator,
    TruncatedBPTT,
    evaluate_rule,
    get_estimator,
)
from lightning_meta.optim.meta.module import RuleMetaTrainer
from lightning_meta.optim.meta.tasks import Task, TaskFamily, get_family

__all__ = [
    "ES",
    "PES",
    "Estimate",
    "GradientEstimator",
    "RuleMetaTrainer",
    "Task",
    "TaskFamily",
    "TruncatedBPTT",
    "evaluate_rule",
    "get_estimator",
    "get_family",
]
