"""MAML with the multi-step loss of MAML++ (Antoniou, Edwards, Storkey, ICLR 2019, arXiv:1810.09502)."""

from torch import nn

from lightning_meta.algorithms import MAML
from lightning_meta.functional import adapt, default_inner_loss, functional_forward


class MultiStepLossMAML(MAML):
    """The outer loss is sum_s w_s * (query loss after inner step s): every step gets a gradient signal. The weights
    start uniform and move to the last step over ``msl_epochs`` epochs (the paper's annealing)."""

    def __init__(self, backbone: nn.Module, inner_steps: int = 5, msl_epochs: int = 10, **kwargs) -> None:
        super().__init__(backbone, inner_steps=inner_steps, **kwargs)
        self.msl_epochs = msl_epochs
        self.step_weights = (1.0 / inner_steps,) * inner_steps  # a tuple: part of a CUDA graph's key

    def on_train_epoch_start(self) -> None:
        n = self.inner_steps
        early = max(1.0 / n - self.current_epoch / (n * self.msl_epochs), 0.03 / n)
        self.step_weights = (early,) * (n - 1) + (1.0 - (n - 1) * early,)

    def task_loss(self, support_x, support_y, query_x, query_y):
        if not self.training:  # evaluation: the query loss after the last step, as MAML
            return super().task_loss(support_x, support_y, query_x, query_y)
        fast, total = dict(self.backbone.named_parameters()), 0.0
        for weight in self.step_weights:
            fast = adapt(self.backbone, fast, support_x, support_y, steps=1, lr=self.inner_lr,
                         first_order=self.first_order, loss_fn=default_inner_loss(support_y),
                         loss_scale=self.inner_loss_scale)  # fmt: skip
            outputs = functional_forward(self.backbone, fast, query_x)
            total = total + weight * self.query_loss(outputs, query_y)
        return total, outputs
