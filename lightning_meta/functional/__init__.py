"""Pure torch (``torch.func``) meta-learning math, no Lightning: inner-loop adaptation, running a
per-task function over the tasks of a batch (loop or vmap), the meta-gradient of a batch of tasks, the fp16
inner-loss scale, CUDA-graph replay, per-task losses, accuracy and intervals."""

from lightning_meta.functional.adaptation import (
    LearningRate,
    StepLearningRates,
    adapt,
    functional_forward,
    gradient_steps,
    inside_vmap,
    is_inside_vmap,
)
from lightning_meta.functional.graphs import CudaGraphCache, module_graph_state
from lightning_meta.functional.losses import (
    default_inner_loss,
    flat_mse_loss,
    mean_ci95,
    per_task_accuracy,
    per_task_cross_entropy,
    per_task_mse,
)
from lightning_meta.functional.meta_gradient import MetaGradient, chunk_meta_gradient, meta_gradient
from lightning_meta.functional.scaling import InnerLossScaler
from lightning_meta.functional.tasks import TaskMode, TaskModeSelector, loop_tasks, run_tasks, task_chunks, vmap_tasks

__all__ = [
    "CudaGraphCache",
    "InnerLossScaler",
    "LearningRate",
    "MetaGradient",
    "StepLearningRates",
    "TaskMode",
    "TaskModeSelector",
    "adapt",
    "chunk_meta_gradient",
    "default_inner_loss",
    "flat_mse_loss",
    "functional_forward",
    "gradient_steps",
    "inside_vmap",
    "is_inside_vmap",
    "loop_tasks",
    "mean_ci95",
    "meta_gradient",
    "module_graph_state",
    "per_task_accuracy",
    "per_task_cross_entropy",
    "per_task_mse",
    "run_tasks",
    "task_chunks",
    "vmap_tasks",
]
