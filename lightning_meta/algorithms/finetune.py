"""The pretrained-backbone pipeline P>M>F (Hu et al., "Pushing the Limits of Simple Pipelines for Few-Shot
Learning: External Data and Fine-Tuning Make a Difference", CVPR 2022, arXiv:2204.07305).

Three stages, one learner:

1. **P**\\ re-training: any backbone with pretrained weights, e.g. a timm model whose weights come from a
   local file (:class:`~lightning_meta.nn.TimmBackbone` with ``checkpoint_path``; nothing is downloaded).
2. **M**\\ eta-training (optional): fitting this module on episodes trains it as ProtoNet.
3. **F**\\ ine-tuning at test time, per task: a copy of the backbone is trained for ``finetune_steps`` SGD
   steps (momentum 0.9) on pseudo-episodes built from the support set alone: the prototypes come from the
   support images and the "queries" are augmented copies of the same images (``augment``, redrawn every
   step), with the ProtoNet loss. The task's queries are then classified by ProtoNet with the fine-tuned
   copy; the meta-parameters never change. ``finetune_steps=0`` is plain ProtoNet.

The fine-tuning rate matters (the paper picks it per domain on validation episodes from
``{0, 1e-4, 1e-3, 1e-2}``): :meth:`FineTuneProtoNet.choose_finetune_lr` does that. Differences from
the authors' code: prototypes are compared by squared Euclidean distance (this library's ProtoNet),
not a scaled cosine, and batch norm uses its running statistics during fine-tuning (the module is in
evaluation mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.protonet import ProtoNet, prototype_logits
from lightning_meta.episode import Episode

__all__ = ["FineTuneProtoNet", "default_support_augment"]


def _identity(x: Tensor) -> Tensor:
    return x


def default_support_augment(x: Tensor) -> Tensor:
    """Random resized crops (scale 0.6-1) and horizontal flips, drawn per image, of a batch ``(n, C, H, W)``."""
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandomResizedCrop(x.shape[-2:], scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    return torch.stack([t(img) for img in x])


class FineTuneProtoNet(ProtoNet):
    """ProtoNet with P>M>F's test-time fine-tuning on each task's support set.

    Args:
        backbone: embedding ``(examples, *x_shape) -> (examples, dim)``, typically pretrained.
        finetune_steps: SGD steps per task at validation/test (0: ProtoNet).
        finetune_lr: their learning rate (choose it with :meth:`choose_finetune_lr`).
        momentum: SGD momentum of fine-tuning.
        augment: ``(n, *x_shape) -> (n, *x_shape)`` random augmentation that makes a pseudo-episode's
            queries from the support images; default :func:`default_support_augment` (images only).
        meta_lr: Adam learning rate of the optional meta-training (ProtoNet).
        task_chunk: see :class:`~lightning_meta.algorithms.MetaLearner`.
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.

    Evaluation adapts with gradients: create the trainer with ``Trainer(inference_mode=False)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        finetune_steps: int = 50,
        finetune_lr: float = 1e-3,
        momentum: float = 0.9,
        augment: Callable[[Tensor], Tensor] | None = default_support_augment,
        meta_lr: float = 1e-3,
        task_chunk: int | None = None,
        max_consecutive_skipped_steps: int | None = 100,
    ) -> None:
        if not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ValueError(f"finetune_steps={finetune_steps!r} must be an integer >= 0")
        if finetune_lr < 0 or not 0 <= momentum < 1:
            raise ValueError(f"finetune_lr={finetune_lr} must be >= 0 and momentum={momentum} in [0, 1)")
        super().__init__(
            backbone,
            meta_lr=meta_lr,
            task_chunk=task_chunk,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        )
        self.finetune_steps, self.finetune_lr, self.momentum = finetune_steps, finetune_lr, momentum
        self.augment = augment if augment is not None else _identity

    @property
    def needs_grad_at_eval(self) -> bool:  # type: ignore[override]
        """Whether evaluation fine-tunes (and so needs gradients)."""
        return self.finetune_steps > 0 and self.finetune_lr > 0

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """ProtoNet logits; at evaluation with ``finetune_steps > 0``, each task with its own fine-tuned copy."""
        if self.training or self.finetune_steps == 0 or self.finetune_lr == 0:
            return super().forward_tasks(support_x, support_y, query_x)
        out = []
        for t in range(support_y.shape[0]):
            params, _ = self.finetune(support_x[t], support_y[t])
            with torch.no_grad():
                s, q = self._embed_with(params, support_x[t]), self._embed_with(params, query_x[t])
                out.append(prototype_logits(s[None], support_y[t][None], q[None], int(support_y[t].max()) + 1)[0])
        return torch.stack(out)

    def finetune(self, support_x: Tensor, support_y: Tensor) -> tuple[dict[str, Tensor], list[float]]:
        """Fine-tuned copy of the backbone's parameters for one task, and the pseudo-episode loss of every step.

        Args:
            support_x: ``(shots, *x_shape)`` support inputs of one task (no padding).
            support_y: ``(shots,)`` labels ``0..ways-1``.
        """
        params = {n: p.detach().clone().requires_grad_(True) for n, p in self.backbone.named_parameters()}
        opt = torch.optim.SGD(list(params.values()), lr=self.finetune_lr, momentum=self.momentum)
        ways = int(support_y.max()) + 1
        losses = []
        with torch.enable_grad():
            for _ in range(self.finetune_steps):
                pseudo_query = self.augment(support_x)
                s = self._embed_with(params, support_x)
                q = self._embed_with(params, pseudo_query)
                loss = F.cross_entropy(prototype_logits(s[None], support_y[None], q[None], ways)[0], support_y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        return {n: p.detach() for n, p in params.items()}, losses

    def _embed_with(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        buffers = dict(self.backbone.named_buffers())
        emb = torch.func.functional_call(self.backbone, {**params, **buffers}, (x,)).flatten(1)
        return emb.float() if emb.dtype in (torch.float16, torch.bfloat16) else emb

    def choose_finetune_lr(
        self,
        episodes: Iterable[Episode],
        candidates: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
        max_batches: int | None = None,
    ) -> dict[float, float]:
        """Set ``finetune_lr`` to the candidate with the best mean query accuracy on validation episodes.

        Args:
            episodes: batched validation episodes (e.g. ``datamodule.val_dataloader()``); the same
                episodes score every candidate (their loader must be deterministic, as this library's are).
            candidates: learning rates tried (0 is ProtoNet without fine-tuning).
            max_batches: use at most this many batches.

        Returns:
            ``{lr: mean accuracy}`` of every candidate.
        """
        from lightning_meta.functional.losses import per_task_accuracy

        batches: list[tuple[Episode, Tensor]] = []
        for i, b in enumerate(episodes):
            if max_batches is not None and i >= max_batches:
                break
            b = b.to(self.device)
            if b.query_y is None:
                raise ValueError(
                    f"choose_finetune_lr scores query accuracy, but episode batch {i} has no query labels "
                    "(query_y None); pass labelled validation episodes"
                )
            batches.append((b, b.query_y))
        if not batches:
            raise ValueError("choose_finetune_lr got no validation episodes")
        was_training, previous = self.training, self.finetune_lr
        self.eval()
        scores = {}
        try:
            for lr in candidates:
                self.finetune_lr = float(lr)
                accs = []
                for b, query_y in batches:
                    rng = torch.random.get_rng_state()
                    torch.manual_seed(0)  # the same augmentations for every candidate
                    try:
                        accs.append(per_task_accuracy(self(b).detach(), query_y))
                    finally:
                        torch.random.set_rng_state(rng)
                scores[float(lr)] = float(torch.cat(accs).mean())
        finally:
            self.train(was_training)
            self.finetune_lr = previous
        self.finetune_lr = max(scores, key=lambda k: scores[k])
        return scores
