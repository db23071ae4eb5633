"""Pure torch (``torch.func``) meta-learning math, no Lightning: inner-loop adaptation, running a
per-task function over the tasks of a batch (loop or vmap), CUDA-graph replay, per-task losses, accuracy and
intervals."""

from lightning_meta.functional.adaptation import (
    LearningRate,
    StepLearningRates,
    adapt,
    functional_forward,
    gradient_steps,
    inside_vmap,
    is_inside_vmap,
)
from lightning_meta.functional.graphs import CudaGraphCache
from lightning_meta.functional.losses import (
    default_inner_loss,
    flat_mse_loss,
    mean_ci95,
    per_task_accuracy,
    per_task_cross_entropy,
    per_task_mse,
)
from lightning_meta.functional.tasks import TaskMode, TaskModeSelector, loop_tasks, run_tasks, task_chunks, vmap_tasks

__all__ = [
    "CudaGraphCache",
    "LearningRate",
    "StepLearningRates",
    "TaskMode",
    "TaskModeSelector",
    "adapt",
    "default_inner_loss",
    "flat_mse_loss",
    "functional_forward",
    "gradient_steps",
    "inside_vmap",
    "is_inside_vmap",
    "loop_tasks",
    "mean_ci95",
    "per_task_accuracy",
    "per_task_cross_entropy",
    "per_task_mse",
    "run_tasks",
    "task_chunks",
    "vmap_tasks",
]
