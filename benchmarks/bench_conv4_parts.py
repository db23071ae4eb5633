"""Component measurements behind docs/bench/conv4.md (history: docs/bench/archive/maml-diary.md §0): memory kept per task, pooling layouts, page faults.

1. Saved tensors of one second-order MAML task (Omniglot 5-way 1-shot, 15 queries per class, Conv4-64
   with max-pooling, 1 inner step at lr 0.5), counted with ``torch.autograd.graph.saved_tensors_hooks``:
   lightning-meta's ``Conv4`` (pool before ReLU, :class:`~lightning_meta.nn.LeanMaxPool2d`) against the
   plain ``conv -> BN -> ReLU -> nn.MaxPool2d`` net that learn2learn's benchmark side runs.
2. Batch norm + 2x2 max-pool on a 75x64x28x28 activation (CPU time, median): forward + backward of
   ``TaskBatchNorm`` then ``LeanMaxPool2d`` (max_pool2d with indices, max_unpool2d backward) against the
   fused op ``Conv4`` now runs (``batch_norm_max_pool2d``); and the pooling forward alone,
   ``F.max_pool2d`` against the strided-view window maximum. (The channels-last round trip this part
   measured before was 25-48 ms against 31-36 ms for NCHW; commit 555be27 of this script.)
3. First-layer (1 input channel) convolution forward + weight gradient: PyTorch's kernel against
   ``unfold`` + ``einsum``.
4. Minor page faults per MAML step (``resource.getrusage``) with ``task_chunk=1`` and ``None``: run it
   once plainly and once with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1099511627776``.
5. Memory layout (why ``Conv4`` runs channels-last on CPU): NCHW against channels-last (NHWC) for the
   first conv (1 input channel) forward + weight gradient, the second conv (64 -> 64 on 14x14) forward +
   both gradients, batch norm forward, PyTorch's batch norm + max-pool forward + backward (what
   learn2learn's net runs) and the fused op, all on 75-image query batches.

Random 28x28 inputs (the kernels' cost does not depend on pixel values), 1 thread.

Usage::

    python benchmarks/bench_conv4_parts.py
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

__all__ = ["main"]


def _median_cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(1e3 * (time.process_time() - t0))
    return statistics.median(times)


def _layer_cases(x1, x2, xb, gb, w1, w2, wb, fused_op) -> dict:
    """The timed layer calls of one memory layout (bound to this layout's tensors)."""
    import torch
    import torch.nn.functional as F

    return {
        "conv1_fwd_wgrad": lambda: torch.autograd.grad(F.conv2d(x1, w1, padding=1).sum(), w1),
        "conv2_fwd_bwd": lambda: torch.autograd.grad(F.conv2d(x2, w2, padding=1).sum(), (x2, w2)),
        "batch_norm_fwd": lambda: torch.native_batch_norm(
            xb.detach(), wb[0].detach(), wb[1].detach(), None, None, True, 0.0, 1e-5
        ),
        "bn_maxpool_torch_fwd_bwd": lambda: torch.autograd.grad(
            F.max_pool2d(F.batch_norm(xb, None, None, *wb, training=True), 2), (xb, *wb), gb
        ),
        "bn_maxpool_fused_fwd_bwd": lambda: torch.autograd.grad(fused_op(xb, *wb, 1e-5, 2), (xb, *wb), gb),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tasks", type=int, default=8, help="tasks per MAML step in the page-fault count")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch import nn

    from lightning_meta.algorithms import MAML
    from lightning_meta.episode import Episode
    from lightning_meta.functional import adapt, functional_forward
    from lightning_meta.nn import Conv4

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict[str, float] = {}

    # 1. saved tensors of one task
    sx, sy = torch.rand(5, 1, 28, 28), torch.arange(5)
    qx, qy = torch.rand(75, 1, 28, 28), torch.arange(5).repeat_interleave(15)
    ours = Conv4(5, hidden=64, downsample="maxpool", pooling="flatten", image_size=28)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [ours.features[4 * i], nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        layers[-3].load_state_dict(ours.features[4 * i + 1].state_dict())
    plain = nn.Sequential(*layers, nn.Flatten(), ours.head)

    def saved_mib(net: nn.Module) -> float:
        seen: dict[tuple, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fast = adapt(
                net, dict(net.named_parameters()), sx, sy, steps=1, lr=0.5, first_order=False, loss_fn=F.cross_entropy
            )
            F.cross_entropy(functional_forward(net, fast, qx), qy)
        return sum(seen.values()) / 2**20

    out["saved_mib_ours"], out["saved_mib_plain"] = saved_mib(ours), saved_mib(plain)
    print(
        f"1. saved tensors of one so1 task: ours {out['saved_mib_ours']:.1f} MiB, plain net "
        f"{out['saved_mib_plain']:.1f} MiB ({out['saved_mib_ours'] / out['saved_mib_plain']:.2f}x)"
    )

    # 2. batch norm + max-pool: the two modules against the fused op; pooling forward alone
    from lightning_meta.nn import LeanMaxPool2d, TaskBatchNorm
    from lightning_meta.nn.pool import _window_max, batch_norm_max_pool2d

    x = torch.randn(75, 64, 28, 28, requires_grad=True)
    g = torch.randn(75, 64, 14, 14)
    bn, pool = TaskBatchNorm(64), LeanMaxPool2d(2)

    def bn_then_pool() -> None:
        torch.autograd.grad(pool(bn(x)), x, g)

    def fused() -> None:
        torch.autograd.grad(batch_norm_max_pool2d(x, bn.weight, bn.bias, bn.eps, 2), x, g)

    xd = x.detach()
    for name, fn in (
        ("bn_pool_modules_ms", bn_then_pool),
        ("bn_pool_fused_ms", fused),
        ("maxpool2d_fwd_ms", lambda: F.max_pool2d(xd, 2, 2)),
        ("window_max_fwd_ms", lambda: _window_max(xd, 2)),
    ):
        fn()
        out[name] = _median_cpu_ms(fn, args.repeats)
    print(
        f"2. BN + 2x2 max-pool fwd+bwd, 75x64x28x28: modules {out['bn_pool_modules_ms']:.1f} ms, fused "
        f"{out['bn_pool_fused_ms']:.1f} ms; pooling forward alone: max_pool2d {out['maxpool2d_fwd_ms']:.1f} ms, "
        f"window maximum {out['window_max_fwd_ms']:.1f} ms (CPU time, median of {args.repeats})"
    )

    # 3. first-layer weight gradient
    x1, g1 = torch.randn(75, 1, 28, 28), torch.randn(75, 64, 28, 28)
    w = torch.randn(64, 1, 3, 3, requires_grad=True)

    def conv_native() -> None:
        torch.autograd.grad(F.conv2d(x1, w, padding=1), w, g1)

    def conv_unfold() -> None:
        with torch.no_grad():
            F.conv2d(x1, w, padding=1)
        torch.einsum("nol,nkl->ok", g1.reshape(75, 64, -1), F.unfold(x1, 3, padding=1))

    for name, fn in (("conv1_native_ms", conv_native), ("conv1_unfold_ms", conv_unfold)):
        fn()
        out[name] = _median_cpu_ms(fn, args.repeats)
    print(
        f"3. first conv forward + weight gradient: PyTorch {out['conv1_native_ms']:.1f} ms, unfold+einsum "
        f"{out['conv1_unfold_ms']:.1f} ms"
    )

    # 4. page faults per step
    t = args.tasks
    episode = Episode(
        torch.rand(t, 5, 1, 28, 28),
        torch.arange(5).repeat(t, 1),
        torch.rand(t, 75, 1, 28, 28),
        torch.arange(5).repeat_interleave(15).repeat(t, 1),
    )
    for chunk in (1, None):
        model = MAML(
            Conv4(5, hidden=64, downsample="maxpool", pooling="flatten", image_size=28),
            inner_lr=0.5,
            task_mode="loop",
            task_chunk=chunk,
        ).train()
        model.training_step(episode, 0).backward()  # warm-up
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):
            model.training_step(episode, 0).backward()
        out[f"minflt_chunk_{chunk}"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 2
        print(f"4. minor page faults per {t}-task step, task_chunk={chunk}: {out[f'minflt_chunk_{chunk}']:.0f}")
    # 5. layouts
    from lightning_meta.nn.pool import batch_norm_max_pool2d as fused_op

    wb = torch.rand(64, requires_grad=True), torch.randn(64, requires_grad=True)
    w1, w2 = torch.randn(64, 1, 3, 3, requires_grad=True), torch.randn(64, 64, 3, 3, requires_grad=True)
    for layout, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
        x1 = torch.randn(75, 1, 28, 28).to(memory_format=fmt)  # `.to` re-strides even one channel
        x2 = torch.randn(75, 64, 14, 14).to(memory_format=fmt).requires_grad_(True)
        xb = torch.randn(75, 64, 28, 28).to(memory_format=fmt).requires_grad_(True)
        gb = torch.randn(75, 64, 14, 14).to(memory_format=fmt)
        cases = _layer_cases(x1, x2, xb, gb, w1, w2, wb, fused_op)
        for name, fn in cases.items():
            fn()
            out[f"{name}_{layout}_ms"] = _median_cpu_ms(fn, args.repeats)
    print(
        f"5. NCHW vs channels-last, CPU ms (median of {args.repeats}): "
        + "; ".join(
            f"{name} {out[f'{name}_nchw_ms']:.1f} vs {out[f'{name}_cl_ms']:.1f}"
            for name in (
                "conv1_fwd_wgrad",
                "conv2_fwd_bwd",
                "batch_norm_fwd",
                "bn_maxpool_torch_fwd_bwd",
                "bn_maxpool_fused_fwd_bwd",
            )
        )
    )
    return out


if __name__ == "__main__":
    main()
