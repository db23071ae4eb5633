"""Backbones: shapes of docs/guide/backbones.md, transductive batch norm, DropBlock, the timm wrapper's local-only weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta.functional import inside_vmap
from lightning_meta.nn import (
    MLP,
    Conv4,
    DropBlock,
    LeanMaxPool2d,
    ResNet12,
    TaskBatchNorm,
    TimmBackbone,
    conv4_maml_mini_imagenet,
    conv4_maml_omniglot,
    conv4_protonet,
    convert_batchnorm,
    timm_weights_dir,
)


def test_conv4_feature_sizes_match_the_papers() -> None:
    omni = conv4_maml_omniglot(5)
    assert omni.features(torch.randn(2, 1, 28, 28)).shape == (2, 64) and omni.head.out_features == 5
    mini = conv4_maml_mini_imagenet(5)
    assert mini.out_dim == 800 and mini.features(torch.randn(2, 3, 84, 84)).shape == (2, 800)
    assert conv4_protonet(1, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert conv4_protonet(3, 84)(torch.randn(2, 3, 84, 84)).shape == (2, 1600)
    assert sum(isinstance(m, TaskBatchNorm) for m in omni.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) and m.track_running_stats for m in conv4_protonet().modules()) == 4


def test_conv4_pool_before_relu_is_the_papers_conv_bn_relu_pool() -> None:
    """Conv4 pools before the ReLU (cheaper); outputs and gradients equal the papers' order, layer names too."""
    torch.manual_seed(0)
    # NCHW on both sides for bit-equality (the channels-last default rounds differently: next test)
    net = Conv4(5, hidden=16, downsample="maxpool", pooling="flatten", image_size=28, channels_last=False).double()
    papers = nn.Sequential()
    for i in range(4):  # conv, BN, ReLU, pool with the same modules (and so the same parameters)
        conv, bn = net.features[4 * i], net.features[4 * i + 1]
        papers.extend([conv, bn, nn.ReLU(), nn.MaxPool2d(2)])
    papers.extend([nn.Flatten(), net.head])
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    out, ref = net(x), papers(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(net.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a MAML-shaped second-order meta-gradient (fused BN -> pool in net.forward, separate modules in papers)
    from torch.func import functional_call

    params = dict(net.named_parameters())
    ref_names = {n: r for n, r in zip(params, dict(papers.named_parameters()))}

    def meta_grad(model, names):
        def loss(p):
            return functional_call(model, {names[n]: v for n, v in p.items()}, (x,)).logsumexp(1).mean()

        inner = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
        fast = {n: v - 0.5 * gi for (n, v), gi in zip(params.items(), inner)}
        return torch.autograd.grad(loss(fast), list(params.values()))

    for a, b in zip(meta_grad(net, {n: n for n in params}), meta_grad(papers, ref_names)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert [n for n, _ in net.named_parameters()][:4] == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
    ]
    assert "features.4.weight" in dict(net.named_parameters())


@pytest.mark.parametrize("kind", ["maml-omniglot", "maxpool", "protonet"])
def test_conv4_channels_last_on_cpu_is_the_same_function(kind: str) -> None:
    """On CPU Conv4 runs channels-last by default: same outputs, gradients and MAML meta-gradients as NCHW (float64);
    inside lightning-meta's vmap path, and with channels_last=False, the activations stay NCHW."""
    from torch.func import functional_call

    torch.manual_seed(0)
    make = {
        "maml-omniglot": lambda cl: Conv4(5, hidden=8, channels_last=cl),
        "maxpool": lambda cl: Conv4(
            5, hidden=8, downsample="maxpool", pooling="flatten", image_size=28, channels_last=cl
        ),
        "protonet": lambda cl: Conv4(
            None,
            hidden=8,
            downsample="maxpool",
            pooling="flatten",
            image_size=28,
            track_running_stats=True,
            channels_last=cl,
        ),
    }[kind]
    auto, nchw = make(None).double(), make(False).double()
    nchw.load_state_dict(auto.state_dict())
    layouts: list[bool] = []
    for net in (auto, nchw):
        net.features[0].register_forward_pre_hook(
            lambda m, args: layouts.append(args[0].stride(1) == 1 and args[0].shape[1] == 1) and None
        )
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    out, ref = auto(x), nchw(x)
    assert layouts == [True, False]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if kind == "protonet":  # running statistics updated alike; evaluation with them
        torch.testing.assert_close(auto.features[1].running_var, nchw.features[1].running_var, rtol=1e-12, atol=0)
        auto.eval(), nchw.eval()
        torch.testing.assert_close(auto(x), nchw(x), rtol=1e-12, atol=1e-12)
        return
    params = dict(auto.named_parameters())

    def meta_grad(model):
        def loss(p):
            return functional_call(model, p, (x,)).logsumexp(1).mean()

        inner = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
        fast = {n: v - 0.5 * gi for (n, v), gi in zip(params.items(), inner)}
        return torch.autograd.grad(loss(fast), list(params.values()))

    for a, b in zip(meta_grad(auto), meta_grad(nchw)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    layouts.clear()
    with inside_vmap():
        torch.func.vmap(lambda xx: auto(xx))(x.view(2, 3, 1, 28, 28))
    assert layouts == [False]
    with pytest.raises(ValueError, match="channels_last"):
        Conv4(5, channels_last="yes")


def test_max_pool_parts_keep_the_layout_and_unpool_any_strides() -> None:
    """The pooling helpers keep channels-last layout; the no-grad unpool (max_unpool2d.out, which re-strides its
    output to the layout ATen suggests) equals the differentiable one for every layout, ambiguous ones included."""
    from lightning_meta.nn.pool import _max_and_offsets, _unpool, _window_max

    torch.manual_seed(0)
    for shape in [(4, 3, 8, 8), (4, 3, 7, 7), (4, 3, 3, 3), (4, 1, 6, 6), (1, 3, 2, 2), (4, 3, 2, 6)]:
        base = torch.randn(shape, dtype=torch.float64)
        for x in (base, base.to(memory_format=torch.channels_last)):
            pooled, offsets = _max_and_offsets(x, 2)
            torch.testing.assert_close(pooled, nn.functional.max_pool2d(base, 2), rtol=0, atol=0)
            torch.testing.assert_close(_window_max(x, 2), pooled, rtol=0, atol=0)
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                assert pooled.is_contiguous(memory_format=torch.channels_last) and offsets.stride() == pooled.stride()
            for g in (
                torch.randn_like(pooled),
                torch.randn_like(pooled).contiguous(memory_format=torch.channels_last),
                torch.randn(pooled.shape[::-1], dtype=torch.float64).permute(3, 2, 1, 0),
            ):
                with torch.no_grad():
                    lean = _unpool(g, offsets, 2, shape[-2:])
                with torch.enable_grad():
                    ref = _unpool(g, offsets, 2, shape[-2:])
                torch.testing.assert_close(lean, ref, rtol=0, atol=0)
                torch.testing.assert_close(lean.abs().sum(), g.abs().sum())  # each gradient value lands once


@pytest.mark.parametrize("side", [8, 7])
def test_lean_maxpool_equals_maxpool_to_second_order_and_saves_only_indices(side: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, side, side, dtype=torch.float64)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def inner_then_outer(pool: nn.Module) -> list[torch.Tensor]:
        """A MAML-shaped second-order gradient through conv -> pool: d/dw of a loss at w - 0.5 * dL/dw."""
        loss = lambda v: pool(torch.nn.functional.conv2d(x, v, padding=1)).square().sum()  # noqa: E731
        (g,) = torch.autograd.grad(loss(w), w, create_graph=True)
        out = pool(torch.nn.functional.conv2d(x, w - 0.5 * g, padding=1))
        return [out, *torch.autograd.grad(out.sin().sum(), w)]

    for a, b in zip(inner_then_outer(LeanMaxPool2d(2)), inner_then_outer(nn.MaxPool2d(2))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LeanMaxPool2d(2)(x.clone().requires_grad_(True))
    assert [t.dtype for t in saved] == [torch.uint8] and saved[0].shape == (3, 4, side // 2, side // 2)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nn.MaxPool2d(2)(x.clone().requires_grad_(True))
    assert any(t.shape == x.shape for t in saved)  # what the lean version avoids: PyTorch keeps the input
    with pytest.raises(ValueError, match="kernel_size"):
        LeanMaxPool2d(0)
    # ties (ReLU zeros, equal values) route the gradient to the first maximum in row-major order, as PyTorch;
    # unbatched (C, H, W) input too
    tied = torch.tensor([[1.0, 1.0, 0.0, 2.0], [1.0, 0.0, 2.0, 2.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 3.0, 3.0]])
    for t in (tied.view(1, 1, 4, 4), tied.view(1, 4, 4), torch.randn(3, 6, 7).relu()):
        a, b = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
        up = torch.arange(float(LeanMaxPool2d(2)(a).numel())).view_as(LeanMaxPool2d(2)(a))
        (ga,) = torch.autograd.grad((LeanMaxPool2d(2)(a) * up).sum(), a)
        (gb,) = torch.autograd.grad((nn.MaxPool2d(2)(b) * up).sum(), b)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    with torch.no_grad():  # evaluation: the strided-view maximum, same values (NaN included)
        x[0, 0, 0, 0] = float("nan")
        for k in (2, 3):
            torch.testing.assert_close(LeanMaxPool2d(k)(x), nn.MaxPool2d(k)(x), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("chunk_elements", [1, 2 * 3 * 6 * 7, 1 << 19])
def test_pooling_chunks_cover_the_batch(chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-grad pooling helpers work chunk by chunk of the leading dim (about _CHUNK_ELEMENTS input elements
    each): one item per chunk, uneven chunks (2 + 2 + 1) and one chunk give PyTorch's max-pool and its backward."""
    import torch.nn.functional as F

    from lightning_meta.nn import pool

    monkeypatch.setattr(pool, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 7, dtype=torch.float64).relu()  # ReLU zeros: ties
    out, offsets = pool._max_and_offsets(x, 2)
    ref, idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    with torch.no_grad():
        torch.testing.assert_close(
            pool._unpool(g, offsets, 2, (6, 7)), F.max_unpool2d(g, idx, 2, output_size=(6, 7)), rtol=0, atol=0
        )
    xr = x.clone().requires_grad_(True)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    (gf,) = torch.autograd.grad((pool.batch_norm_max_pool2d(xr, w, b, 1e-5, 2) * g).sum(), xr)
    (gr,) = torch.autograd.grad((F.max_pool2d(F.batch_norm(xr, None, None, w, b, training=True), 2) * g).sum(), xr)
    torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-12)
    ref3 = F.max_pool2d(F.batch_norm(xr, None, None, -w, b, training=True), 3)  # other kernels, negative scale
    torch.testing.assert_close(pool.batch_norm_max_pool2d(xr, -w, b, 1e-5, 3), ref3, rtol=1e-12, atol=1e-12)


def test_lean_maxpool_falls_back_to_maxpool_under_deterministic_algorithms() -> None:
    """max_unpool2d has no deterministic implementation: Trainer(deterministic=True) must still train."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = LeanMaxPool2d(2)(x)
        (g,) = torch.autograd.grad(out.sum(), x)
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(out, nn.MaxPool2d(2)(x))
    assert g.sum() == out.numel()  # one unit of gradient per window


def test_fused_batchnorm_maxpool_equals_the_two_ops_to_second_order() -> None:
    """Conv4's fused BN -> max-pool: same output, first- and second-order gradients as F.batch_norm + F.max_pool2d
    (float64, including the weight/bias gradients), gradcheck/gradgradcheck, and it saves only the input and indices."""
    import torch.nn.functional as F

    from lightning_meta.nn.pool import batch_norm_max_pool2d

    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 7, dtype=torch.float64, requires_grad=True)  # odd width: floor rounding
    w = torch.empty(3, dtype=torch.float64).uniform_(-1.5, 1.5).requires_grad_(True)  # a negative scale too
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 3, 3, 3, dtype=torch.float64)

    def ref(x, w, b):
        return F.max_pool2d(F.batch_norm(x, None, None, w, b, training=True, eps=1e-5), 2)

    def fused(x, w, b):
        return batch_norm_max_pool2d(x, w, b, 1e-5, 2)

    def second_order(fn):
        gx, gw, gb = torch.autograd.grad((fn(x, w, b).tanh() * v).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + (gw * gb).sum() + gb.pow(3).sum(), (x, w, b))

    torch.testing.assert_close(fused(x, w, b), ref(x, w, b), rtol=0, atol=0)
    for a, c in zip(
        torch.autograd.grad((fused(x, w, b) * v).sum(), (x, w, b)),
        torch.autograd.grad((ref(x, w, b) * v).sum(), (x, w, b)),
    ):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    for a, c in zip(second_order(fused), second_order(ref)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    small = tuple(t.detach()[:3, :, :4, :4].clone().requires_grad_(True) if t.dim() == 4 else t for t in (x, w, b))
    assert torch.autograd.gradcheck(fused, small) and torch.autograd.gradgradcheck(fused, small)

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(x, w, b)
    assert sorted((tuple(t.shape), t.dtype) for t in saved if t.dim() == 4) == sorted(
        [((5, 3, 6, 7), torch.float64), ((5, 3, 3, 3), torch.uint8)]
    )  # the input and 1-byte window positions; never the normalised output


def test_every_backbone_has_features_and_head() -> None:
    for net in (Conv4(3), MLP(), ResNet12(3, channels=(2, 2, 2, 2), pooling="mean")):
        x = torch.randn(2, 1) if isinstance(net, MLP) else torch.randn(2, 1 if isinstance(net, Conv4) else 3, 16, 16)
        torch.testing.assert_close(net(x), net.head(net.features(x)))
    pooled = Conv4(3, hidden=4, downsample="maxpool", pooling="flatten", image_size=16)  # fused BN -> pool in forward
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(pooled(x), pooled.head(pooled.features(x)))


@pytest.mark.parametrize("training", [True, False])
def test_task_batchnorm_equals_torch_batchnorm_without_running_stats(training: bool) -> None:
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    ref = nn.BatchNorm2d(3, track_running_stats=False).double().train(training)
    ours = convert_batchnorm(nn.Sequential(ref))[0]
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(ref.weight)
    assert isinstance(ours, TaskBatchNorm)
    torch.testing.assert_close(ours.train(training)(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = TaskBatchNorm(3)(torch.randn(6, 3, 4, 4).bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_task_batchnorm_second_order_is_exact_under_vmap() -> None:
    """The reason TaskBatchNorm exists: vmap(grad(grad)) through it equals the per-task loop."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), TaskBatchNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    params = dict(net.named_parameters())
    x = torch.randn(3, 7, 3, dtype=torch.float64)

    def task(xt):
        def inner(p):
            return (torch.func.functional_call(net, p, (xt,)) ** 2).mean()

        g = torch.func.grad(inner)(params)
        return inner({n: params[n] - 0.3 * g[n] for n in params})

    loop = torch.autograd.grad(sum(task(x[i]) for i in range(3)), list(params.values()))
    with inside_vmap():  # lightning-meta's vmap path: TaskBatchNorm uses primitive ops there
        vm = torch.autograd.grad(torch.func.vmap(task)(x).sum(), list(params.values()))
    for a, b in zip(loop, vm):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the per-task loop runs PyTorch's fused kernel; its second-order gradients equal the primitive ops'
    with inside_vmap():
        loop_primitive = torch.autograd.grad(sum(task(x[i]) for i in range(3)), list(params.values()))
    for a, b in zip(loop, loop_primitive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resnet12_sizes() -> None:
    assert ResNet12(5).out_dim == 16000  # MetaOptNet, 84x84, no global pooling
    assert ResNet12(5, image_size=32).out_dim == 640 * 2 * 2
    net = ResNet12(5, channels=(4, 6, 8, 10), pooling="mean", dropblock_keep_prob=0.9)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5) and net.out_dim == 10


def test_dropblock_drops_square_blocks_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    db = DropBlock(keep_prob=0.8, block_size=3).train()
    out = db(torch.ones(64, 1, 12, 12))
    dropped = (out == 0).float()
    kept_fraction = 1 - dropped.mean().item()
    assert 0.7 < kept_fraction < 0.9
    assert out.mean().item() == pytest.approx(1.0, rel=1e-5)  # rescaled to the same expectation
    # every dropped unit lies in a fully dropped 3x3 square
    full = torch.nn.functional.max_pool2d(-torch.nn.functional.max_pool2d(-dropped, 3, 1, 1), 3, 1, 1)
    assert torch.equal(full * dropped, dropped)
    assert torch.equal(db.eval()(torch.ones(2, 1, 4, 4)), torch.ones(2, 1, 4, 4))


def test_timm_backbone_never_downloads_and_loads_local_weights(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"never downloads.*resnet10t\.safetensors"):
        TimmBackbone("resnet10t", pretrained=True)
    with pytest.raises(ValueError, match="no model"):
        TimmBackbone("not_a_model_xyz")
    source = TimmBackbone("resnet10t")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.features.state_dict()}, path)
    loaded = TimmBackbone("resnet10t", 5, checkpoint_path=path)
    for (n, a), b in zip(source.features.state_dict().items(), loaded.features.state_dict().values()):
        assert torch.equal(a, b), n
    timm_weights_dir().mkdir(parents=True, exist_ok=True)
    torch.save(source.features.state_dict(), timm_weights_dir() / "resnet10t.pth")
    cached = TimmBackbone("resnet10t", pretrained=True)
    assert torch.equal(cached.features.conv1[0].weight, source.features.conv1[0].weight)


def test_timm_backbone_transductive_bn_works_with_maml() -> None:
    from lightning_meta.algorithms import MAML
    from lightning_meta.episode import Episode

    net = TimmBackbone("resnet10t", 3, transductive_bn=True)
    assert not any(getattr(m, "track_running_stats", False) for m in net.modules())
    maml = MAML(net, inner_lr=0.1, first_order=True, task_mode="loop")
    x, y = torch.randn(1, 3, 3, 16, 16), torch.arange(3).view(1, 3)
    loss = maml.training_step(Episode(x, y, x, y), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in maml.parameters())


def test_pool_layout_rule_is_atens_suggested_memory_format() -> None:
    """pool._layout mirrors ATen's Tensor::suggest_memory_format() (what max_unpool2d.out re-strides to) on every
    stride pattern of small shapes: contiguous, channels-last, transposed, sliced and permuted, size-1 dims included."""
    import itertools

    prims = pytest.importorskip("torch._prims_common")
    if not hasattr(prims, "suggest_memory_format"):
        pytest.skip("this torch has no Python twin of suggest_memory_format")
    from lightning_meta.nn.pool import _layout

    checked = 0
    for shape in itertools.product([1, 2, 5], [1, 3], [1, 2, 4], [1, 3]):
        base = torch.randn(shape)
        for t in (
            base,
            base.to(memory_format=torch.channels_last),
            base.transpose(2, 3),
            base[..., ::2, :],
            base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        ):
            assert _layout(t) == prims.suggest_memory_format(t), (tuple(t.shape), t.stride())
            checked += 1
    assert checked == 180


def test_conv4_lean_ops_switch_keeps_the_function_and_its_gradients() -> None:
    """``lean_ops=False`` runs PyTorch's max-pool (and no fused batch norm + max-pool), ``True`` allows the lean ops
    on every device: same outputs and input gradients in float64 as the default CPU path; a bad value is refused."""
    torch.manual_seed(0)
    nets = [
        Conv4(5, hidden=6, downsample="maxpool", pooling="flatten", image_size=28, lean_ops=v)
        for v in (None, False, True)
    ]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    assert type(nets[1].features[2]) is nn.MaxPool2d
    assert nets[2].features[2].any_device and not nets[0].features[2].any_device
    x = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    outs = []
    for net in nets:
        xi = x.clone().requires_grad_()
        y = net.double()(xi)
        (g,) = torch.autograd.grad(y.square().sum(), xi)
        outs.append((y.detach(), g))
    for y, g in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, outs[0][1], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="lean_ops"):
        Conv4(5, lean_ops="yes")
