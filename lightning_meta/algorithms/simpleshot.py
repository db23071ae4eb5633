"""SimpleShot: nearest-centroid classification of transformed features (Wang et al. 2019, arXiv:1911.04623).

Features ``f(x)`` of a backbone trained on the base classes are transformed before a nearest-centroid
classifier (class centroid = mean support feature, Euclidean distance):

* ``"UN"``: unnormalised, ``f(x)``;
* ``"L2N"``: L2-normalised, ``f(x) / ||f(x)||``;
* ``"CL2N"``: centred with the mean feature of the base-class (training) images, then L2-normalised,
  ``(f(x) - m) / ||f(x) - m||`` (the paper's best).

The base mean ``m`` is computed once from base-class images with :meth:`SimpleShot.set_base_mean`
(the backbone in evaluation mode) and stored as a buffer, so it travels with checkpoints. The logits
are negative squared distances (:func:`~lightning_meta.algorithms.protonet.prototype_logits`), whose
argmax is the nearest centroid. Training episodically (a ProtoNet loss in the transformed space) is
possible but optional: the paper trains the backbone as an ordinary classifier of the base classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.protonet import ProtoNet

__all__ = ["SimpleShot"]

Normalization = Literal["UN", "L2N", "CL2N"]


class SimpleShot(ProtoNet):
    """Nearest-centroid few-shot classifier over centred, L2-normalised features.

    Args:
        backbone: embedding ``(examples, *x_shape) -> (examples, dim)``, e.g. a pretrained
            :class:`~lightning_meta.nn.TimmBackbone` with ``out_features=None``.
        normalization: ``"CL2N"`` (default), ``"L2N"`` or ``"UN"`` (see the module docstring).
        base_mean: the base-class mean feature ``(dim,)``; else set it with :meth:`set_base_mean`
            before evaluating with ``"CL2N"``.
        meta_lr: Adam learning rate, if trained episodically.
        task_chunk: see :class:`~lightning_meta.algorithms.MetaLearner`.
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.

    Example:
        >>> net = SimpleShot(nn.Identity(), base_mean=torch.tensor([1.0, 1.0]))
        >>> net.embed(torch.tensor([[4.0, 5.0]]))  # (3, 4) / 5
        tensor([[0.6000, 0.8000]])
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        normalization: Normalization = "CL2N",
        base_mean: Tensor | None = None,
        meta_lr: float = 1e-3,
        task_chunk: int | None = None,
        max_consecutive_skipped_steps: int | None = 100,
    ) -> None:
        if normalization not in ("UN", "L2N", "CL2N"):
            raise ValueError(f"normalization={normalization!r}; use 'CL2N', 'L2N' or 'UN'")
        super().__init__(
            backbone,
            meta_lr=meta_lr,
            task_chunk=task_chunk,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        )
        self.normalization = normalization
        self.register_buffer("base_mean", None if base_mean is None else torch.as_tensor(base_mean).detach().clone())

    @torch.no_grad()
    def set_base_mean(self, batches: Iterable[Tensor] | Tensor, batch_size: int = 256) -> Tensor:
        """Set ``base_mean`` to the mean backbone feature of base-class images and return it.

        Args:
            batches: the base (training) classes' images: a tensor ``(n, *x_shape)`` or an iterable of
                such batches (e.g. over a :class:`~lightning_meta.datamodules.ClassStore`'s images, as floats).
            batch_size: batch size when ``batches`` is one tensor.
        """
        if isinstance(batches, Tensor):
            batches = batches.split(batch_size)
        was_training = self.training
        self.eval()
        total: Tensor | None = None
        count = 0
        try:
            for x in batches:
                f = self.backbone(x.to(self.device)).flatten(1).double()
                total = f.sum(0) if total is None else total + f.sum(0)
                count += len(f)
        finally:
            self.train(was_training)
        if total is None or count == 0:
            raise ValueError("set_base_mean got no images; pass the base (training) classes' images")
        self.base_mean = (total / count).float()
        return self.base_mean

    def embed(self, x: Tensor) -> Tensor:
        """The transformed features (see the module docstring)."""
        emb = super().embed(x)
        if self.normalization == "CL2N":
            if self.base_mean is None:
                raise RuntimeError(
                    "SimpleShot(normalization='CL2N') needs the base-class mean feature: call "
                    "set_base_mean(base_images) or pass base_mean=..., or use normalization='L2N'"
                )
            emb = emb - self.base_mean.to(emb)
        if self.normalization in ("L2N", "CL2N"):
            emb = F.normalize(emb, dim=-1)
        return emb
