"""Task families: vmapped populations equal per-task loops, seeding, splits, Omniglot (when present), MLPs of drawn
sizes (defaults unchanged), the character-level transformer against torch's encoder layer."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.optim.meta.omniglot import OmniglotTaskFamily
from lightning_meta.optim.meta.tasks import (
    CHAR_VOCAB,
    ConvTaskFamily,
    GRULanguageModelTaskFamily,
    MLPTaskFamily,
    Task,
    TaskFamily,
    TeacherStudentTaskFamily,
    TransformerLanguageModelTaskFamily,
    char_corpus,
    get_family,
    sample_batches,
    sample_tasks,
    stack_params,
)
from tests.optim.meta_test_rules import LogLRRule

_VARIED = {"widths": (4, 64), "depths": (0, 3), "batch_sizes": (3, 40)}


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("quadratic", {}),
        ("mlp", {}),
        ("teacher_student", {}),
        ("conv", {}),
        ("gru_lm", {}),
        ("transformer_lm", {"layers": 2}),
        ("mlp", _VARIED),
        ("teacher_student", _VARIED),
    ],
)
def test_vmapped_population_equals_a_loop(name, kwargs):
    family = get_family(name, **kwargs)
    assert isinstance(family, TaskFamily)
    gen = torch.Generator().manual_seed(0)
    tasks = sample_tasks(family, gen, 3)
    assert all(isinstance(t, Task) for t in tasks)
    params = stack_params([t.init(gen) for t in tasks])
    batch = sample_batches(tasks, gen)
    batched = torch.func.vmap(tasks[0].loss)(params, batch)
    grads, _ = torch.func.vmap(torch.func.grad_and_value(tasks[0].loss))(params, batch)
    for i, task in enumerate(tasks):
        p = {k: v[i].clone().requires_grad_(True) for k, v in params.items()}
        loss = task.loss(p, tuple(b[i] for b in batch))
        torch.testing.assert_close(batched[i], loss.detach())
        for k, g in zip(p, torch.autograd.grad(loss, list(p.values()))):
            torch.testing.assert_close(grads[k][i], g)


def test_tasks_are_a_pure_function_of_the_generator_and_differ_between_draws():
    family = get_family("teacher_student")
    a = family.sample(torch.Generator().manual_seed(4))
    b = family.sample(torch.Generator().manual_seed(4))
    xa, ya = a.sample_batch(torch.Generator().manual_seed(1))
    xb, yb = b.sample_batch(torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = family.sample(torch.Generator().manual_seed(5))
    _, yc = c.sample_batch(torch.Generator().manual_seed(1))
    assert not torch.allclose(ya, yc)  # another teacher labels the same inputs differently


def test_quadratic_loss_is_zero_at_the_centre_without_noise():
    task = get_family("quadratic", noise=0.0).sample(torch.Generator().manual_seed(0))
    batch = task.sample_batch(torch.Generator())
    assert task.loss({"x": task.center.clone()}, batch) == 0
    assert task.loss({"x": task.center + 1}, batch) == pytest.approx(0.5 * task.curvature.mean().item())


def test_conv_task_shapes_and_learnability():
    family = ConvTaskFamily(image_size=8, channels=(4, 4), classes=3, batch_size=12)
    task = family.sample(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (12, 1, 8, 8) and y.shape == (12,) and int(y.max()) < 3
    params = task.init(torch.Generator().manual_seed(0))
    opt_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(opt_params.values(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    first = None
    for _ in range(60):
        loss = task.loss(opt_params, task.sample_batch(gen))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first  # the synthetic templates are learnable


def test_omniglot_family_reads_the_shared_zips(omniglot_dir):
    family = OmniglotTaskFamily(omniglot_dir, image_size=10, ways=4, channels=(4,), batch_size=8)
    assert family.images.shape[1:] == (20, 10, 10) and family.images.shape[0] > 100
    assert 0.0 <= float(family.images.min()) and float(family.images.max()) <= 1.0
    task = family.sample(torch.Generator().manual_seed(0))
    x, y = task.sample_batch(torch.Generator().manual_seed(0), "valid")
    assert x.shape == (8, 1, 10, 10) and int(y.max()) < 4
    assert torch.isfinite(task.loss(task.init(torch.Generator().manual_seed(0)), (x, y)))
    flat = OmniglotTaskFamily(omniglot_dir, image_size=10, ways=4, channels=(), hidden=(8,), batch_size=8)
    xf, _ = flat.sample(torch.Generator().manual_seed(0)).sample_batch(torch.Generator().manual_seed(0))
    assert xf.shape == (8, 100)


def test_bad_arguments_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="task family 'cifar'"):
        get_family("cifar")
    with pytest.raises(ValueError, match="activation='swish'"):
        get_family("mlp", activation="swish")
    with pytest.raises(ValueError, match="split='test'"):
        get_family("quadratic").sample(torch.Generator()).sample_batch(torch.Generator(), "test")
    with pytest.raises(FileNotFoundError, match="images_background_small"):
        OmniglotTaskFamily(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniglotTaskFamily(tmp_path / "missing")


def test_gru_lm_equals_torch_gru_and_starts_at_log_vocab():
    family = get_family("gru_lm")
    gen = torch.Generator().manual_seed(0)
    task = family.sample(gen)
    params = {k: v.double() for k, v in task.init(gen).items()}
    (windows,) = task.sample_batch(gen)
    assert windows.shape == (16, 33) and int(windows.max()) <= len(CHAR_VOCAB)
    # independent reference: torch.nn.GRU (gates r, z, n; weights (3 * hidden, in)) and a linear read-out
    gru = torch.nn.GRU(16, 32, batch_first=True).double()
    with torch.no_grad():
        gru.weight_ih_l0.copy_(params["w_ih"].T)
        gru.weight_hh_l0.copy_(params["w_hh"].T)
        gru.bias_ih_l0.copy_(params["b_ih"])
        gru.bias_hh_l0.copy_(params["b_hh"])
        states, _ = gru(params["embed"][windows[:, :-1]])
        logits = states @ params["w_out"] + params["b_out"]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), windows[:, 1:].reshape(-1))
    torch.testing.assert_close(task.loss(params, (windows,)), expected, rtol=1e-12, atol=1e-12)
    # at initialisation the prediction is close to uniform over the 97 character ids
    initial = [t.loss(t.init(gen), t.sample_batch(gen)) for t in (family.sample(gen) for _ in range(8))]
    assert abs(float(torch.stack(initial).mean()) - math.log(97)) < 0.3


def _adam_lowers_the_losses(task, *, lr: float, steps: int, drop: float) -> None:
    """``steps`` Adam steps on ``task`` from its init lower the late training loss and the validation loss by more
    than ``drop`` nats (from about log(97) = 4.57 towards the character frequencies)."""
    gen = torch.Generator().manual_seed(2)
    params = {k: v.requires_grad_(True) for k, v in task.init(gen).items()}
    valid = [task.sample_batch(torch.Generator().manual_seed(3 + i), "valid") for i in range(4)]

    def valid_loss() -> float:
        with torch.no_grad():
            return float(torch.stack([task.loss(params, b) for b in valid]).mean())

    before = valid_loss()
    opt = torch.optim.Adam(params.values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = task.loss(params, task.sample_batch(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    late = losses[-max(steps // 20, 5) :]
    assert sum(late) / len(late) < losses[0] - drop
    assert valid_loss() < before - drop


def test_a_few_adam_steps_on_a_gru_lm_task_lower_its_training_and_validation_loss():
    _adam_lowers_the_losses(get_family("gru_lm").sample(torch.Generator().manual_seed(1)), lr=1e-2, steps=60, drop=1.0)


def test_gru_lm_texts_are_disjoint():
    meta, aside = char_corpus("meta-train"), char_corpus("held-aside")
    assert len(meta) > 200_000 and len(aside) > 40_000
    decoded = "".join(CHAR_VOCAB[i] if i < len(CHAR_VOCAB) else "?" for i in aside[:400].tolist())
    assert decoded not in "".join(CHAR_VOCAB[i] if i < len(CHAR_VOCAB) else "?" for i in meta.tolist())
    family = GRULanguageModelTaskFamily(task_chars=1024)
    task = family.sample(torch.Generator().manual_seed(0))
    assert len(task.train_text) == 896 and len(task.valid_text) == 128  # consecutive, so no window overlaps
    with pytest.raises(ValueError, match="corpus='test'"):
        GRULanguageModelTaskFamily(corpus="test")
    with pytest.raises(ValueError, match="task_chars=10000000 exceeds"):
        GRULanguageModelTaskFamily(task_chars=10_000_000)


def _old_mixture_draw(gen, tasks):
    """The fixed-size MLP family's draw before sizes could vary (in, hidden, classes = 16, 32, 4; batch 32): class
    means per task, then He-initialised weights and one batch per task."""
    means = [torch.randn(4, 16, generator=gen) for _ in tasks]
    inits = [
        (torch.randn(16, 32, generator=gen) * math.sqrt(2 / 16), torch.randn(32, 4, generator=gen) / 4) for _ in tasks
    ]
    batches = []
    for m in means:
        y = torch.randint(4, (32,), generator=gen)
        batches.append((m[y] + torch.randn(32, 16, generator=gen), y))
    return means, inits, batches


def _old_teacher_draw(gen, tasks):
    """The fixed-size teacher-student draw (in 8, teacher 8-16-1 with N(0, 0.25) biases, noise 0.05, batch 32)."""
    teachers = []
    for _ in tasks:
        w0, w1 = torch.randn(8, 16, generator=gen) * 0.5, torch.randn(16, 1, generator=gen) * math.sqrt(2 / 16)
        teachers.append((w0, w1, 0.5 * torch.randn(16, generator=gen), 0.5 * torch.randn(1, generator=gen)))
    inits = [(torch.randn(8, 32, generator=gen) * 0.5, torch.randn(32, 1, generator=gen) / 4) for _ in tasks]
    batches = []
    for w0, w1, b0, b1 in teachers:
        x = torch.randn(32, 8, generator=gen)
        y = (torch.tanh(x @ w0 + b0) @ w1 + b1).squeeze(-1)
        batches.append((x, y + 0.05 * torch.randn(y.shape, generator=gen)))
    return inits, batches


def test_default_mlp_families_draw_exactly_the_tasks_of_the_fixed_size_code():
    """Without widths/depths/batch_sizes nothing extra is drawn: populations, initialisations and batches are the
    old fixed-size draws (re-implemented above), so existing checkpoints and recorded results stay valid."""
    for family, old in ((get_family("mlp"), _old_mixture_draw), (get_family("teacher_student"), _old_teacher_draw)):
        gen, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        tasks = sample_tasks(family, gen, 3)
        params = [t.init(gen) for t in tasks]
        batches = [t.sample_batch(gen) for t in tasks]
        expected = old(ref, tasks)
        if family.name == "mlp":
            means, inits, expected_batches = expected
            assert all(torch.equal(t.sampler.means, m) for t, m in zip(tasks, means))
        else:
            inits, expected_batches = expected
        for p, (w0, w1), b, (x, y) in zip(params, inits, batches, expected_batches):
            assert torch.equal(p["w0"], w0) and torch.equal(p["w1"], w1) and set(p) == {"w0", "b0", "w1", "b1"}
            assert torch.equal(b[0], x) and torch.equal(b[1], y)
        assert torch.equal(gen.get_state(), ref.get_state())  # nothing else was drawn


def test_varied_mlp_sizes_are_drawn_per_population_in_range_and_deterministically():
    family = MLPTaskFamily(widths=(16, 128), depths=(1, 4), batch_sizes=(16, 256))
    gen = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(60):
        tasks = sample_tasks(family, gen, 2)
        assert tasks[0].sizes == tasks[1].sizes  # one architecture per population, so it vmaps
        (x, _), (x1, _) = tasks[0].sample_batch(gen), tasks[1].sample_batch(gen)
        assert x.shape == x1.shape
        drawn.append((tasks[0].sizes, x.shape[0]))
    widths = [s[1] for s, _ in drawn]
    depths = [len(s) - 2 for s, _ in drawn]
    batches = [b for _, b in drawn]
    assert all(s[0] == 16 and s[-1] == 4 and len(set(s[1:-1])) == 1 for s, _ in drawn)
    assert 16 <= min(widths) and max(widths) <= 128 and len(set(widths)) > 20
    assert set(depths) == {1, 2, 3, 4}
    assert 16 <= min(batches) and max(batches) <= 256 and len(set(batches)) > 20
    # log-uniform: about half below the geometric middle (sqrt(16 * 129) = 45.4), not a third (uniform: 0.26)
    assert 0.35 < sum(w < 45.4 for w in widths) / len(widths) < 0.65
    again = torch.Generator().manual_seed(0)
    assert sample_tasks(family, again, 2)[0].sizes == drawn[0][0]  # a pure function of the generator
    # a single sample is a population of one; an int fixes a size; depth 0 is a linear model
    task = MLPTaskFamily(widths=24, depths=0, batch_sizes=5).sample(torch.Generator().manual_seed(1))
    assert task.sizes == (16, 4) and task.sample_batch(torch.Generator())[0].shape == (5, 16)
    student = TeacherStudentTaskFamily(widths=(8, 8), depths=2).sample(torch.Generator().manual_seed(1))
    assert student.sizes == (8, 8, 8, 1)
    assert MLPTaskFamily(depths=(3, 3), hidden=(20, 7)).sample(torch.Generator()).sizes == (16, 20, 20, 20, 4)


def test_an_estimator_restarts_a_varied_family_with_new_sizes_and_equal_ones_within():
    from lightning_meta.optim.meta.estimators import TruncatedBPTT

    family = get_family("mlp", widths=(4, 64), depths=(1, 3), batch_sizes=(8, 64))
    est = TruncatedBPTT(family, num_tasks=3, truncation_length=2, min_horizon=2, max_horizon=2, inner_lr=0.1)
    shapes = set()
    for _ in range(6):  # each estimate runs a whole horizon, so each starts a new population
        estimate = est.estimate(LogLRRule())
        assert torch.isfinite(estimate.gradient["log_scale"])
        shapes.add(tuple(tuple(v.shape) for v in est.state.params.values()))
    assert len(shapes) > 1


def test_bad_size_ranges_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"widths=\(0, 4\) must satisfy 1 <= low <= high"):
        MLPTaskFamily(widths=(0, 4))
    with pytest.raises(ValueError, match=r"depths=\(3, 1\) must satisfy 0 <= low <= high"):
        TeacherStudentTaskFamily(depths=(3, 1))
    with pytest.raises(ValueError, match=r"batch_sizes=\(16,\) must be an int or a \(low, high\) pair"):
        MLPTaskFamily(batch_sizes=(16,))
    with pytest.raises(ValueError, match=r"hidden=64 must be a sequence of widths, e.g. hidden=\(64,\)"):
        get_family("teacher_student", hidden=64)
    with pytest.raises(ValueError, match="depths needs a hidden width"):
        MLPTaskFamily(depths=(1, 2), hidden=())
    with pytest.raises(ValueError, match="'mlp' takes no argument 'width'; it takes .*widths"):
        get_family("mlp", width=8)
    with pytest.raises(ValueError, match="d_model=32, heads=3"):
        get_family("transformer_lm", heads=3)


def _torch_reference_loss(task, params, windows):
    """The same network from torch modules: TransformerEncoderLayer(norm_first, GELU) blocks under a causal mask,
    a LayerNorm and the (tied or separate) read-out; weights copied from ``params`` ((in, out) -> (out, in))."""
    d, seq = task.d_model, windows.shape[1] - 1
    x = params["embed"][windows[:, :-1]] + params["pos"][:seq]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(seq, dtype=torch.float64)
    for i in range(task.layers):
        p = {k.removeprefix(f"block{i}."): v for k, v in params.items() if k.startswith(f"block{i}.")}
        layer = torch.nn.TransformerEncoderLayer(
            d, task.heads, task.ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        ).double()
        with torch.no_grad():
            for module, name in ((layer.norm1, "ln1"), (layer.norm2, "ln2")):
                module.weight.copy_(p[f"{name}.w"])
                module.bias.copy_(p[f"{name}.b"])
            layer.self_attn.in_proj_weight.copy_(p["qkv.w"].T)
            layer.self_attn.in_proj_bias.copy_(p["qkv.b"])
            layer.self_attn.out_proj.weight.copy_(p["proj.w"].T)
            layer.self_attn.out_proj.bias.copy_(p["proj.b"])
            for module, name in ((layer.linear1, "fc1"), (layer.linear2, "fc2")):
                module.weight.copy_(p[f"{name}.w"].T)
                module.bias.copy_(p[f"{name}.b"])
        layer.eval()
        with torch.no_grad():
            x = layer(x, src_mask=mask, is_causal=True)
    x = torch.nn.functional.layer_norm(x, (d,), params["ln_f.w"], params["ln_f.b"])
    logits = x @ (params["embed"].T if task.tied else params["out.w"]) + params["out.b"]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, task.vocab), windows[:, 1:].reshape(-1))


@pytest.mark.parametrize(("layers", "heads", "tied"), [(1, 2, True), (2, 4, False)])
def test_transformer_lm_equals_torch_encoder_layers_with_a_causal_mask(layers, heads, tied):
    family = get_family("transformer_lm", layers=layers, heads=heads, tied=tied, ff=48, seq_len=12, batch_size=5)
    gen = torch.Generator().manual_seed(0)
    task = family.sample(gen)
    params = task.init(gen)
    assert ("out.w" in params) != tied and params["block0.qkv.w"].shape == (32, 96)
    # perturb every weight (gains, biases, zeros included) so no part of the block is checked at a trivial value
    params = {k: (v + 0.3 * torch.randn(v.shape, generator=gen)).double() for k, v in params.items()}
    (windows,) = task.sample_batch(gen)
    assert windows.shape == (5, 13)
    expected = _torch_reference_loss(task, params, windows)
    torch.testing.assert_close(task.loss(params, (windows,)), expected, rtol=0, atol=1e-10)


def test_transformer_lm_starts_at_log_vocab_learns_and_draws_deterministically():
    family = TransformerLanguageModelTaskFamily()
    gen = torch.Generator().manual_seed(0)
    initial = [t.loss(t.init(gen), t.sample_batch(gen)) for t in (family.sample(gen) for _ in range(8))]
    assert abs(float(torch.stack(initial).mean()) - math.log(97)) < 0.3
    a, b = (family.sample(torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a.train_text, b.train_text) and torch.equal(a.valid_text, b.valid_text)
    pa, pb = (t.init(torch.Generator().manual_seed(6)) for t in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(a.train_text, family.sample(torch.Generator().manual_seed(7)).train_text)

    _adam_lowers_the_losses(family.sample(torch.Generator().manual_seed(1)), lr=3e-3, steps=200, drop=1.5)


def test_transformer_lm_meta_gradients_flow_through_the_unroll():
    """Truncated BPTT differentiates the inner updates (second derivatives through the masked softmax)."""
    from lightning_meta.optim.meta.estimators import TruncatedBPTT

    family = get_family("transformer_lm", corpus="held-aside", seq_len=8, batch_size=4)
    est = TruncatedBPTT(family, num_tasks=2, truncation_length=3, min_horizon=6, max_horizon=6, inner_lr=0.1)
    estimate = est.estimate(LogLRRule())
    gradient = float(estimate.gradient["log_scale"])
    assert math.isfinite(gradient) and gradient < 0  # a larger step lowers the loss this early in training
