"""Matching Networks for One Shot Learning (Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra, NeurIPS 2016,
arXiv:1606.04080).

A query ``x`` is labelled by attention over the labelled support set ``S = {(x_i, y_i)}``:
``P(y = k | x, S) = sum_i a(x, x_i) [y_i = k]`` with ``a(x, x_i) = softmax_i(cos(f(x), g(x_i)))``, i.e. the
softmax-weighted sum of the support examples' one-hot labels (paper eq. 1-2); the loss is ``-log P(y | x, S)``.
Nothing is fitted per task, so evaluation needs no gradients and runs under inference mode.

Without full context embeddings, ``f`` and ``g`` are both the backbone. With ``fce=True`` (paper §2.1.2, appendix A):

* ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)``: a bidirectional LSTM reads the support embeddings ``g'`` as a
  sequence (in the order the episode gives them) and its two hidden states are added to the embedding;
* ``f(x, S) = attLSTM(f'(x), g(S), K)``: ``K`` steps of an LSTM whose input is always ``f'(x)`` and whose hidden
  state is ``[h_{k-1}, r_{k-1}]``: ``h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x)``,
  ``r_{k-1} = sum_i softmax_i(h_{k-1}^T g(x_i)) g(x_i)``; ``f(x, S) = h_K``. Each query is read on its own, so ``f``
  does not depend on the other queries; it depends on the support order only through ``g``.

``f' = g'`` is one shared backbone, as in the paper's experiments (a Conv4-64 for Omniglot and miniImageNet).

Departures from the paper:

* the number of read steps ``K`` is not stated in the paper; ``read_steps=5`` by default here;
* the attention LSTM starts from ``h_0 = f'(x)`` (that is ``h^_0 = 0``) and ``c_0 = 0``, which the paper leaves open;
* the outputs are the log class probabilities ``log P(k | x, S)``: the base class's cross-entropy takes a
  log-softmax of them, which leaves them unchanged (they already normalise), so the loss is the paper's;
* under half-precision autocast the backbone runs in the autocast dtype but the cosine, the attention and the
  LSTMs run in float32 (a small part of the cost; ProtoNet keeps its distances in float32 the same way);
* batch norm in the backbone keeps running statistics (non-transductive, like ProtoNet); support and query
  images of all tasks of a batch are embedded in one pass, so in training the batch statistics span the batch;
* ``scale`` (an option; 1 is the paper's attention) multiplies the cosines before the softmax. With ``scale = 1``
  the attention can never be sharp: cosines lie in [-1, 1] (in [0, 1] after a ReLU backbone), so with 20 support
  images the probability of the right one stays below ``e / (e + 19 / e) = 0.28`` and the loss is bounded away
  from 0, which slows training; cosine classifiers since (e.g. Gidaris & Komodakis 2018, Chen et al. 2019) scale
  the cosines by about 10 or learn the scale (``learn_scale=True``, starting from ``scale``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner

__all__ = ["FullContextEmbedding", "MatchingNetworks", "cosine_attention_log_probs"]


def cosine_attention_log_probs(
    support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: float | Tensor = 1.0
) -> Tensor:
    """Log class probabilities of Matching Networks' cosine attention (paper eq. 1-2).

    ``log P(k | q) = log sum_{i: y_i = k} softmax_i(scale * cos(q, s_i))``, computed as a masked log-sum-exp
    (``scale = 1``: the paper's attention).

    Args:
        support: ``(tasks, support, dim)`` support embeddings ``g(x_i)``.
        support_y: ``(tasks, support)`` labels in ``0..ways-1``; every class needs a support example.
        query: ``(tasks, queries, dim)`` query embeddings ``f(x)``.
        ways: number of classes.
        scale: multiplies the cosines before the softmax (an inverse temperature).

    Returns:
        ``(tasks, queries, ways)`` log-probabilities (each row's exponentials sum to 1).

    Example:
        >>> s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> cosine_attention_log_probs(s, torch.tensor([[0, 1]]), torch.tensor([[[1.0, 0.0]]]), 2).exp()
        tensor([[[0.7311, 0.2689]]])
    """
    onehot = support_y.unsqueeze(-1) == torch.arange(ways, device=support_y.device)  # (tasks, support, ways)
    empty = ~onehot.any(1)  # (tasks, ways)
    if bool(empty.any()):
        task, k = (int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"class {k} has no support example in task {task} (support labels {support_y[task].tolist()}); "
            f"labels must cover 0..ways-1 = 0..{ways - 1}"
        )
    sim = F.normalize(query, dim=-1, eps=1e-8) @ F.normalize(support, dim=-1, eps=1e-8).transpose(1, 2)
    log_attention = (sim * scale).log_softmax(-1)  # (tasks, queries, support)
    mask = torch.zeros(onehot.shape, dtype=sim.dtype, device=sim.device).masked_fill(~onehot, float("-inf"))
    return torch.logsumexp(log_attention.unsqueeze(-1) + mask.unsqueeze(1), dim=2)  # (tasks, queries, ways)


class FullContextEmbedding(nn.Module):
    """The full context embeddings ``g`` (bidirectional LSTM over the support set) and ``f`` (attention LSTM).

    Args:
        dim: embedding size ``d`` of ``f'``/``g'``; both LSTMs have ``d`` hidden units.
        read_steps: read steps ``K`` of the attention LSTM.

    Example:
        >>> fce = FullContextEmbedding(4, read_steps=2)
        >>> g = fce.support(torch.randn(3, 5, 4))  # (tasks, support, dim)
        >>> fce.query(torch.randn(3, 7, 4), g).shape
        torch.Size([3, 7, 4])
    """

    def __init__(self, dim: int, read_steps: int = 5) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1 (the backbone's embedding size)")
        if read_steps < 1:
            raise ValueError(f"read_steps={read_steps} must be >= 1")
        self.dim, self.read_steps = dim, read_steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        # attention LSTM: input f'(x) (d), hidden state [h, r] (2d), output h^ and cell c (d)
        self.read_input = nn.Linear(dim, 4 * dim)
        self.read_hidden = nn.Linear(2 * dim, 4 * dim, bias=False)

    def support(self, embeddings: Tensor) -> Tensor:
        """``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)`` for ``(tasks, support, dim)`` embeddings ``g'``."""
        out, _ = self.support_lstm(embeddings)  # (tasks, support, 2 * dim)
        return out[..., : self.dim] + out[..., self.dim :] + embeddings

    def query(self, embeddings: Tensor, support: Tensor) -> Tensor:
        """``f(x, S)`` for ``(tasks, queries, dim)`` embeddings ``f'`` and ``(tasks, support, dim)`` ``g(S)``."""
        h = embeddings  # h_0 = f'(x)
        c = torch.zeros_like(embeddings)
        from_input = self.read_input(embeddings)  # the input is f'(x) at every step
        for _ in range(self.read_steps):
            attention = (h @ support.transpose(1, 2)).softmax(-1)  # (tasks, queries, support)
            read = attention @ support  # r_{k-1}
            gates = from_input + self.read_hidden(torch.cat([h, read], -1))
            i, f, g, o = gates.chunk(4, -1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh() + embeddings  # h_k = h^_k + f'(x)
        return h


class MatchingNetworks(MetaLearner):
    """Matching Networks over an embedding network, with optional full context embeddings.

    Args:
        backbone: embedding ``(examples, *x_shape) -> (examples, dim)`` (``f' = g'``), e.g. the Conv4-64 of
            :func:`lightning_meta.nn.conv4_protonet` (batch norm with running statistics is fine here).
        fce: full context embeddings (the bidirectional support LSTM and the attention LSTM). Off by default:
            the Omniglot figures quoted from the paper name no FCE, and the miniImageNet ones list runs without
            and with it (the cosine-attention model is the basic one).
        read_steps: read steps ``K`` of the attention LSTM (used with ``fce``).
        scale: inverse temperature of the cosine attention (1: the paper's; see the module docstring).
        learn_scale: meta-learn the scale (a parameter ``log_scale``, starting at ``log(scale)``).
        embedding_dim: the backbone's output size, needed to size the LSTMs with ``fce``; ``None``: the
            backbone's ``out_dim`` attribute (every :mod:`lightning_meta.nn` backbone has one).
        meta_lr: Adam learning rate.
        task_chunk: tasks per backward chunk (``None``: all at once).
        max_consecutive_skipped_steps: stop after this many non-finite (skipped) steps in a row.

    Example:
        >>> from lightning_meta.episode import Episode
        >>> net = MatchingNetworks(nn.Flatten())
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.1]]])
        >>> net(Episode(x[:, :2], torch.tensor([[0, 1]]), x[:, 2:], torch.tensor([[0]]))).exp()
        tensor([[[0.7209, 0.2791]]])
    """

    needs_grad_at_eval = False

    def __init__(
        self,
        backbone: nn.Module,
        *,
        fce: bool = False,
        read_steps: int = 5,
        scale: float = 1.0,
        learn_scale: bool = False,
        embedding_dim: int | None = None,
        meta_lr: float = 1e-3,
        task_chunk: int | None = None,
        max_consecutive_skipped_steps: int | None = 100,
    ) -> None:
        super().__init__(
            meta_lr=meta_lr,
            task_mode="loop",
            task_chunk=task_chunk,
            max_consecutive_skipped_steps=max_consecutive_skipped_steps,
        )
        if not scale > 0:
            raise ValueError(f"scale={scale} must be > 0 (it multiplies the cosines before the softmax)")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.fce = fce
        self.scale = float(scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale))) if learn_scale else None
        self.read_steps = read_steps
        self.context: FullContextEmbedding | None = None
        if fce:
            dim = embedding_dim if embedding_dim is not None else getattr(backbone, "out_dim", None)
            if not isinstance(dim, int):
                raise ValueError(
                    f"fce=True sizes its LSTMs from the embedding size, but {type(backbone).__name__} has no integer "
                    "out_dim attribute; pass embedding_dim= (the backbone's output size)"
                )
            self.context = FullContextEmbedding(dim, read_steps)

    def forward_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Log class probabilities ``(tasks, queries, ways)``, embedding all tasks' images in one pass."""
        if support_y.is_floating_point():
            raise ValueError("MatchingNetworks is a classifier; got float (regression) targets")
        tasks, n_support = support_y.shape
        n_query = query_x.shape[1]
        emb = self.backbone(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])).flatten(1)
        with torch.autocast(emb.device.type, enabled=False):  # cosine, attention and LSTMs in full precision
            if emb.dtype in (torch.float16, torch.bfloat16):
                emb = emb.float()
            if self.context is not None:  # the LSTMs' own dtype (float32 under mixed precision)
                emb = emb.to(self.context.read_input.weight.dtype)
            support = emb[: tasks * n_support].view(tasks, n_support, -1)  # g'(x_i)
            query = emb[tasks * n_support :].view(tasks, n_query, -1)  # f'(x)
            if self.context is not None:
                if support.shape[-1] != self.context.dim:
                    raise ValueError(
                        f"the backbone gives {support.shape[-1]}-d embeddings but the FCE LSTMs were sized for "
                        f"{self.context.dim}; pass embedding_dim={support.shape[-1]}"
                    )
                support = self.context.support(support)  # g(x_i, S)
                query = self.context.query(query, support)  # f(x, S)
            ways = int(support_y.max()) + 1
            scale = self.log_scale.exp() if self.log_scale is not None else self.scale
            return cosine_attention_log_probs(support, support_y, query, ways, scale)
