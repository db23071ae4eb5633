"""LEO: Meta-Learning with Latent Embedding Optimization (Rusu, Rao, Sygnowski, Vinyals, Pascanu, Osindero,
Hadsell, ICLR 2019, arXiv:1807.05960), following the official code deepmind/leo (docs/algorithms/leo.md).

Per task, on fixed feature vectors ``x`` (``feature_dim``, 640 for the paper's WRN-28-10 features):

1. encoder: ``Linear(feature_dim -> latent_dim, no bias)`` (dropout on its input), then a relation net
   (MLP ``[2L, 2L, 2L]``, no bias) on every concatenated pair of support codes, averaged over the
   partner and then over the examples of each class -> ``(mu, sigma_raw)`` per class;
   ``sigma = max(exp(sigma_raw) - 1, 1e-10)`` (``sigma_raw`` also capped at 10, a departure); training samples ``z_i ~ N(mu_{y_i}, sigma_{y_i})`` for
   every support example ``i`` (evaluation: ``z = mu``), KL against ``N(0, I)`` from that sample;
2. decoder: ``Linear(latent_dim -> 2 feature_dim, no bias)`` -> per-example weight distribution,
   ``sigma_w = max(exp(raw) - (1 - sqrt(2 / (feature_dim + ways))), 1e-10)``; class ``n``'s weights are
   the mean of its examples' weights; logits ``x . w_n``;
3. ``inner_steps`` latent steps ``z <- z - latent_lr * grad_z L_support(decode(z))`` with a learned
   per-dimension ``latent_lr`` (init 1.0), then ``finetune_steps`` steps on the decoded per-example
   weights with a learned per-feature ``finetune_lr`` (init 1e-3); second order end to end;
4. outer loss: query cross-entropy ``+ kl_weight * KL + encoder_penalty * mean((stopgrad(z') - z)^2)
   + l2_penalty * sum(||W||^2) / 2 + orthogonality_penalty * mean((C - I)^2)``, where ``C`` is the
   correlation matrix of the decoder's rows (one per latent dimension). That is the *code's*
   orthogonality term; the paper's Eq. 7 writes ``||C - I||_1``.

The meta-gradient is clipped per tensor by value (``grad_clip_value``, 0.1) then by norm
(``grad_clip_norm``, 0.1), as the code. The published accuracies (61.76% / 77.59% miniImageNet) need
the WRN-28-10 embeddings of the LEO release (:class:`~lightning_meta.datamodules.features.LEOEmbeddingDataModule`);
on features of other backbones (:class:`~lightning_meta.datamodules.features.FeatureDataModule`)
they are not comparable.

Departures: a non-finite loss or gradient skips the optimizer step (the :class:`MetaLearner` guard)
instead of the code's substitution of L2-only gradients; the L2 term covers the encoder, relation net
and decoder weights (the learned rates excluded); class codes are averaged with a one-hot matrix, so
episodes need not be ordered by class.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.episode import Episode
from lightning_meta.functional.adaptation import gradient_steps
from lightning_meta.functional.tasks import TaskMode

__all__ = ["LEO", "orthogonality"]


def orthogonality(weight: Tensor) -> Tensor:
    """``mean((C - I)^2)`` of the correlation matrix ``C`` of the rows of ``weight`` (LEO code's penalty).

    Example:
        >>> float(orthogonality(torch.eye(3)))
        0.0
    """
    norms = weight.norm(dim=1, keepdim=True) + 1e-32
    corr = (weight @ weight.T) / (norms @ norms.T)
    return ((corr - torch.eye(len(weight), device=weight.device, dtype=weight.dtype)) ** 2).mean()


class LEO(MetaLearner):
    """Latent Embedding Optimization on feature vectors ``(examples, feature_dim)``.

    Args:
        feature_dim: size of the input features (640 for the LEO embeddings).
        ways: classes per episode (sizes the one-hot class averaging and the decoder's Glorot offset).
        latent_dim: size of the latent code.
        inner_steps: latent-space steps.
        finetune_steps: steps on the decoded weights.
        latent_lr_init: initial per-dimension latent rate.
        finetune_lr_init: initial per-feature fine-tuning rate.
        dropout: dropout rate on the features (training only).
        kl_weight: weight of the KL term (beta).
        encoder_penalty: weight of ``mean((stopgrad(z') - z)^2)`` (gamma).
        l2_penalty: weight of the L2 term (lambda_1).
        orthogonality_penalty: weight of the decoder orthogonality term (lambda_2).
        first_order: treat inner gradients as constants (the paper differentiates end to end).
        grad_clip_value: per-tensor clip of the meta-gradient by value (``None``: off).
        grad_clip_norm: per-tensor clip of the meta-gradient by norm after the value clip (``None``: off).
        meta_lr: Adam learning rate (the code's best mini 1-shot value).
        task_mode: ``"auto"``, ``"loop"`` or ``"vmap"`` (see :class:`MetaLearner`).
        task_chunk: tasks per backward chunk (``"auto"``: 1 in loop mode, all under vmap).
        inner_loss_scale: fp16 inner loss scale (``None``: dynamic).
        cuda_graphs: replay training steps as CUDA graphs on a GPU (see :class:`MetaLearner`).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.
        task_memory_budget: memory that ``task_mode="auto"`` may give the tasks of a batch: bytes, a fraction in
            (0, 1] of the free memory, or ``None`` for the device's default (see :class:`MetaLearner`).
        eval_inner_steps: latent steps at validation/test/prediction (``None``: ``inner_steps``).

    Example:
        >>> from lightning_meta.episode import Episode
        >>> leo = LEO(feature_dim=8, ways=2, latent_dim=4)
        >>> x, y = torch.randn(3, 4, 8), torch.tensor([[0, 1, 1, 0]] * 3)
        >>> leo(Episode(x, y, x, y)).shape
        torch.Size([3, 4, 2])
    """

    def __init__(
        self,
        feature_dim: int = 640,
        *,
        ways: int = 5,
        latent_dim: int = 64,
        inner_steps: int = 5,
        finetune_steps: int = 5,
        latent_lr_init: float = 1.0,
        finetune_lr_init: float = 1e-3,
        dropout: float = 0.308,
        kl_weight: float = 0.756,
        encoder_penalty: float = 5.76e-6,
        l2_penalty: float = 3.62e-10,
        orthogonality_penalty: float = 0.188,
        first_order: bool = False,
        grad_clip_value: float | None = 0.1,
        grad_clip_norm: float | None = 0.1,
        meta_lr: float = 2.739e-4,
        task_mode: TaskMode = "auto",
        task_chunk: int | Literal["auto"] | None = "auto",
        inner_loss_scale: float | None = None,
        cuda_graphs: bool = False,
        max_consecutive_skipped_steps: int | None = 100,
        task_memory_budget: float | None = None,
        eval_inner_steps: int | None = None,
    ) -> None:
        super().__init__(
            meta_lr=meta_lr,
            task_mode=task_mode,
            task_chunk=task_chunk,
            inner_loss_scale=inner_loss_scale,
            cuda_graphs=cuda_graphs,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
            task_memory_budget=task_memory_budget,
        )
        if feature_dim < 1 or latent_dim < 1 or ways < 2:
            raise ValueError(f"feature_dim={feature_dim}, latent_dim={latent_dim} must be >= 1 and ways={ways} >= 2")
        if inner_steps < 0 or finetune_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError(
                f"inner_steps={inner_steps}, finetune_steps={finetune_steps}, eval_inner_steps={eval_inner_steps} "
                "must be >= 0"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.save_hyperparameters()
        self.feature_dim, self.ways, self.latent_dim = feature_dim, ways, latent_dim
        self.inner_steps, self.finetune_steps, self.first_order = inner_steps, finetune_steps, first_order
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.kl_weight, self.encoder_penalty = kl_weight, encoder_penalty
        self.l2_penalty, self.orthogonality_penalty = l2_penalty, orthogonality_penalty
        self.grad_clip_value, self.grad_clip_norm = grad_clip_value, grad_clip_norm
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.Linear(feature_dim, latent_dim, bias=False)
        self.relation = nn.Sequential(
            nn.Linear(2 * latent_dim, 2 * latent_dim, bias=False), nn.ReLU(),
            nn.Linear(2 * latent_dim, 2 * latent_dim, bias=False), nn.ReLU(),
            nn.Linear(2 * latent_dim, 2 * latent_dim, bias=False),
        )  # fmt: skip
        self.decoder = nn.Linear(latent_dim, 2 * feature_dim, bias=False)
        self.latent_lr = nn.Parameter(torch.full((latent_dim,), float(latent_lr_init)))
        self.finetune_lr = nn.Parameter(torch.full((feature_dim,), float(finetune_lr_init)))
        self.weight_sigma_offset = 1.0 - math.sqrt(2.0 / (feature_dim + ways))

    # ------------------------------------------------------------------ the pieces
    def encode(self, support_x: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-example latent codes ``z (examples, latent_dim)`` (sampled in training, the mean at evaluation),
        the class one-hot ``(examples, ways)`` and the single-sample KL (0 at evaluation)."""
        onehot = F.one_hot(support_y, self.ways).to(support_x.dtype)  # (examples, ways)
        codes = self.encoder(self.dropout(support_x))  # (examples, latent)
        m = codes.shape[0]
        pairs = torch.cat([codes.unsqueeze(1).expand(m, m, -1), codes.unsqueeze(0).expand(m, m, -1)], dim=-1)
        rel = self.relation(pairs).mean(1)  # (examples, 2 * latent): averaged over the partner
        per_class = (onehot.T @ rel) / onehot.sum(0).clamp_min(1).unsqueeze(1)  # (ways, 2 * latent)
        mu, sigma = _split_gaussian(onehot @ per_class, 1.0)  # per example: its class's (mu, sigma)
        if not self.training:
            return mu, onehot, mu.new_zeros(())
        z = mu + sigma * torch.randn_like(mu)
        return z, onehot, _kl_single_sample(z, mu, sigma)

    def decode(self, z: Tensor) -> Tensor:
        """Per-example classifier weights ``(examples, feature_dim)`` (sampled in training)."""
        mu, sigma = _split_gaussian(self.decoder(z), self.weight_sigma_offset)
        return mu + sigma * torch.randn_like(mu) if self.training else mu

    def logits(self, x: Tensor, weights: Tensor, onehot: Tensor) -> Tensor:
        """``x . w_n`` with ``w_n`` the mean weight of class ``n``'s examples: ``(len(x), ways)``."""
        class_w = (onehot.T @ weights) / onehot.sum(0).clamp_min(1).unsqueeze(1)  # (ways, feature_dim)
        return self.dropout(x) @ class_w.T.to(x.dtype)

    def latent_steps(
        self, z: Tensor, support_x: Tensor, support_y: Tensor, onehot: Tensor, steps: int, first_order: bool
    ) -> Tensor:
        """``steps`` latent updates ``z <- z - latent_lr * grad_z CE(support | decode(z))``."""

        def objective(f: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(self.logits(support_x, self.decode(f["z"]), onehot).float(), support_y)

        return gradient_steps(
            objective,
            {"z": z},
            steps=steps,
            lr={"z": self.latent_lr},
            first_order=first_order,
            loss_scale=self.inner_loss_scale,
        )["z"]

    def finetune(
        self, weights: Tensor, support_x: Tensor, support_y: Tensor, onehot: Tensor, steps: int, first_order: bool
    ) -> Tensor:
        """``steps`` updates of the per-example weights with the per-feature ``finetune_lr``."""

        def objective(f: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(self.logits(support_x, f["w"], onehot).float(), support_y)

        return gradient_steps(
            objective,
            {"w": weights},
            steps=steps,
            lr={"w": self.finetune_lr},
            first_order=first_order,
            loss_scale=self.inner_loss_scale,
        )["w"]

    # ------------------------------------------------------------------ the MetaLearner contract
    def adapt(self, support_x: Tensor, support_y: Tensor) -> dict[str, Tensor]:
        """Encode, latent steps, decode, fine-tune: ``{"weights", "onehot", "kl", "encoder_penalty"}``."""
        first_order = self.first_order or not self.training
        z0, onehot, kl = self.encode(support_x, support_y)
        if not self.training:
            z0 = z0.detach()
        steps = self.inner_steps if self.training else self.eval_inner_steps
        z = self.latent_steps(z0, support_x, support_y, onehot, steps, first_order)
        weights = self.finetune(self.decode(z), support_x, support_y, onehot, self.finetune_steps, first_order)
        penalty = ((z.detach() - z0) ** 2).mean()
        return {"weights": weights, "onehot": onehot, "kl": kl, "encoder_penalty": penalty}

    def predict(self, state: dict[str, Tensor], query_x: Tensor) -> Tensor:
        """Query logits ``(ways * queries, ways)``."""
        return self.logits(query_x, state["weights"], state["onehot"])

    @override
    def task_loss(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One task's query cross-entropy plus, in training, its KL and encoder-penalty terms."""
        if not self.training:
            logits = self.task_outputs(support_x, support_y, query_x)
            return self.query_loss(logits, query_y), logits
        state = self.adapt(support_x, support_y)
        logits = self.predict(state, query_x)
        penalty = self.kl_weight * state["kl"] + self.encoder_penalty * state["encoder_penalty"]
        return self.query_loss(logits, query_y) + penalty.float(), logits

    @override
    def task_losses(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Per-task :meth:`task_loss` plus (in training) the batch-level L2 and orthogonality terms."""
        sx = episode.support_x
        if episode.query_y is None:
            raise ValueError("LEO's task losses need query labels, but the episode has query_y None")
        if sx.shape[-1] != self.feature_dim:
            raise ValueError(
                f"LEO was built for feature_dim={self.feature_dim} but episodes have {sx.shape[-1]}-d inputs; "
                "feed feature vectors (e.g. lightning_meta.datamodules.features.FeatureDataModule) of that size"
            )
        losses, logits = self.run_task_loss(self.task_loss, sx, episode.support_y, episode.query_x, episode.query_y)
        if self.training:
            losses = losses + self.regularization()
        return losses, logits

    def regularization(self) -> Tensor:
        """``l2_penalty * sum ||W||^2 / 2`` over encoder, relation and decoder weights, plus the orthogonality term."""
        weights = [
            self.encoder.weight,
            self.decoder.weight,
            *(m.weight for m in self.relation if isinstance(m, nn.Linear)),
        ]
        l2 = sum((w.float() ** 2).sum() for w in weights) / 2
        # torch's decoder weight is (2 * feature_dim, latent): its columns are the code's rows (one per latent dim).
        return self.l2_penalty * l2 + self.orthogonality_penalty * orthogonality(self.decoder.weight.float().T)

    @override
    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: Any = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Per tensor: clamp to ``grad_clip_value``, then rescale to norm ``<= grad_clip_norm`` (unless the Trainer clips)."""
        if gradient_clip_val is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.grad_clip_value is not None:
                    p.grad.clamp_(-self.grad_clip_value, self.grad_clip_value)
                if self.grad_clip_norm is not None:
                    norm = p.grad.norm()
                    p.grad.mul_(torch.clamp(self.grad_clip_norm / (norm + 1e-6), max=1.0))
        return None


def _split_gaussian(params: Tensor, offset: float) -> tuple[Tensor, Tensor]:
    """``(mu, max(exp(min(raw, 10)) - offset, 1e-10))`` from the two halves of the last dim.

    LEO's sigma, clamped below (> 0, as the code) and, a departure, above (``raw <= 10``), so that a
    diverging latent step cannot overflow ``exp`` into an infinite sigma and a NaN loss.
    """
    mu, raw = params.chunk(2, dim=-1)
    return mu, (torch.exp(raw.clamp_max(10.0)) - offset).clamp_min(1e-10)


def _kl_single_sample(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """``mean(log N(z; mu, sigma) - log N(z; 0, 1))`` from one sample (LEO code)."""
    log_q = -0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma)
    log_p = -0.5 * z**2
    return (log_q - log_p).float().mean()
