"""Reptile (Nichol, Achiam, Schulman 2018, arXiv:1803.02999) written against lightning-meta's public API."""

import torch
from torch import nn

from lightning_meta.algorithms import MetaLearner
from lightning_meta.functional import adapt, default_inner_loss, functional_forward


class Reptile(MetaLearner):
    """theta <- theta + meta_lr * mean over tasks of (theta' - theta), theta' after inner SGD steps on the support."""

    def __init__(self, backbone: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, **execution) -> None:
        super().__init__(**execution)  # meta_lr, task_mode, task_chunk, inner_loss_scale, ...
        self.backbone, self.inner_lr, self.inner_steps = backbone, inner_lr, inner_steps
        self.eval_inner_steps = inner_steps  # adapt_and_predict(steps=...) sets it for one call

    def fine_tune(self, support_x, support_y, steps):  # first order: theta' is a constant of theta
        params = {n: p.detach() for n, p in self.backbone.named_parameters()}
        return adapt(self.backbone, params, support_x, support_y, steps=steps, lr=self.inner_lr, first_order=True,
                     loss_fn=default_inner_loss(support_y), loss_scale=self.inner_loss_scale)  # fmt: skip

    def adapt(self, support_x, support_y):  # evaluation and inference
        return self.fine_tune(support_x, support_y, self.eval_inner_steps)

    def predict(self, state, query_x):
        return functional_forward(self.backbone, state, query_x)

    def task_meta_gradient(self, support_x, support_y, query_x, query_y):
        fast = self.fine_tune(support_x, support_y, self.inner_steps)
        outputs = functional_forward(self.backbone, fast, query_x)
        directions = {f"backbone.{n}": p.detach() - fast[n] for n, p in self.backbone.named_parameters()}
        return directions, self.query_loss(outputs, query_y), outputs  # train/loss: the query loss after adapting

    def configure_optimizers(self):  # the paper's outer step: plain SGD along the mean direction
        return torch.optim.SGD(self.parameters(), lr=self.meta_lr)
