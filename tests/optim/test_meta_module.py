"""The meta-training LightningModule under Trainer.fit (single process and 2-process DDP) and the pretrain CLI."""

from __future__ import annotations

import io
import json

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_meta.optim.meta.estimators import evaluate_rule
from lightning_meta.optim.meta.module import RuleMetaTrainer
from lightning_meta.optim.meta.tasks import get_family
from lightning_meta.optim.rules import rule_hash
from tests.optim.meta_test_rules import LogLRRule

_QUADRATIC = {"quadratic": {"min_curvature": 0.5, "max_curvature": 2.0, "noise": 0.05}}


def _module(rule, estimator="pes", **kw):
    defaults = dict(
        families=("quadratic",),
        family_kwargs=_QUADRATIC,
        estimator=estimator,
        num_tasks=4,
        truncation_length=5,
        min_horizon=10,
        max_horizon=20,
        sigma=0.05,
        inner_lr=10.0,
        meta_lr=0.1,
        steps_per_epoch=8,
        seed=0,
    )
    defaults.update(kw)
    return RuleMetaTrainer(rule, **defaults)


def _trainer(**kw):
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _eval(rule):
    family = get_family("quadratic", **_QUADRATIC["quadratic"])
    return evaluate_rule(rule, family, num_tasks=8, horizon=20, inner_lr=10.0, seed=99)


@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_fit_lowers_the_meta_loss_of_a_too_small_step(estimator):
    rule = LogLRRule(log_scale=-3.0)  # steps e^3 too small: the held-out meta-loss must fall as it grows
    before = _eval(rule)
    module = _module(rule, estimator)
    _trainer(max_steps=24).fit(module)
    assert module.rule.log_scale.item() > -2.0
    assert _eval(module.rule) < 0.8 * before
    assert module.skipped_estimates == 0


class _TwoRankReference(RuleMetaTrainer):
    """One process doing what two DDP ranks do: average the estimates of rank 0's and rank 1's estimators."""

    def setup(self, stage):
        self._make_estimators(rank=0)
        rank0 = self.estimators
        self._make_estimators(rank=1)
        self.estimators = rank0 + self.estimators
        self.skipped_estimates = 0


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_spawn_equals_averaging_the_ranks_estimates():
    def fit_ddp():
        module = _module(LogLRRule(-3.0), meta_lr=0.05)
        _trainer(max_steps=4, strategy="ddp_spawn", devices=2).fit(module)
        return module

    ddp, ref_rule = fit_ddp(), LogLRRule(-3.0)
    reference = _TwoRankReference(
        ref_rule, **{k: v for k, v in ddp.hparams.items() if k != "families"}, families=("quadratic",)
    )
    _trainer(max_steps=4, devices=1).fit(reference)
    single = _module(LogLRRule(-3.0), meta_lr=0.05)
    _trainer(max_steps=4, devices=1).fit(single)
    torch.testing.assert_close(ddp.rule.log_scale, reference.rule.log_scale, rtol=1e-5, atol=1e-6)
    assert abs(ddp.rule.log_scale.item() - single.rule.log_scale.item()) > 1e-4  # rank 1's problems count


def test_module_validates_its_arguments():
    with pytest.raises(ValueError, match="families is empty"):
        RuleMetaTrainer("celo2", families=())
    with pytest.raises(ValueError, match="'adam_es'"):
        RuleMetaTrainer("celo2", estimator="adam_es")
    with pytest.raises(ValueError, match="task family 'mnist'"):
        RuleMetaTrainer("celo2", families=("mnist",))


def test_anchor_adds_its_closed_form_gradient_to_the_estimate():
    # Same seeds, same weights (moved off the anchor by delta): the surrogates' gradients differ by anchor * delta.
    grads = {}
    for anchor in (0.0, 0.7):
        module = _module(LogLRRule(-1.0), anchor=anchor)
        module.setup("fit")
        with torch.no_grad():
            module.rule.log_scale.add_(0.25)  # delta = 0.25 from the weights at construction
        module.training_step(None, 0).backward()
        grads[anchor] = module.rule.log_scale.grad.item()
    assert grads[0.7] - grads[0.0] == pytest.approx(0.7 * 0.25, rel=1e-5)
    with pytest.raises(ValueError, match="anchor=-1.0"):
        _module(LogLRRule(), anchor=-1.0)


def test_trainable_meta_trains_only_the_named_weights():
    from lightning_meta.optim.rules import get_rule

    module = _module("celo2", trainable=["schedule"], inner_lr=0.1, sigma=0.1)
    _trainer(max_steps=2).fit(module)
    init = get_rule("celo2").state_dict()
    changed = {k for k, v in module.rule.state_dict().items() if not torch.equal(v, init[k])}
    assert changed == {"schedule"}
    with pytest.raises(ValueError, match="'skipp'.*names no weight"):
        _module("celo2", trainable=["skipp"])


def test_ranks_own_different_inner_problems():
    module = _module(LogLRRule(), families=("mlp",), family_kwargs=None)
    module._make_estimators(rank=0)
    a = module.estimators[0]
    module._make_estimators(rank=1)
    b = module.estimators[0]
    for est in (a, b):
        est.estimate(module.rule)
    assert not torch.equal(a.state.params["w0"], b.state.params["w0"])


def test_pretrain_writes_loadable_weights_and_provenance_reproducibly(tmp_path):
    from lightning_meta.optim.meta.pretrain import main

    argv = [
        "--rule",
        "celo2",
        "--steps",
        "2",
        "--families",
        "mlp",
        "--num-tasks",
        "2",
        "--truncation-length",
        "3",
        "--min-horizon",
        "6",
        "--max-horizon",
        "6",
        "--eval-tasks",
        "2",
    ]
    path = main([*argv, "--out", str(tmp_path)])
    again = json.loads(main([*argv, "--out", str(tmp_path / "again")]).read_text())
    meta = json.loads(path.read_text())
    state = torch.load(tmp_path / "celo2.pt", weights_only=True)
    from lightning_meta.optim.rules import get_rule

    rule = get_rule("celo2")
    rule.load_state_dict(state)
    assert meta["sha256"] == rule_hash(rule)
    assert meta["rule"] == "celo2" and meta["meta_steps"] == 2 and meta["estimator"] == "pes"
    assert meta["task_families"] == ["mlp"] and set(meta["final_meta_loss"]) == {"mlp"}
    assert "--steps 2" in meta["reproduce"]
    assert rule_hash(rule) != rule_hash(get_rule("celo2"))  # two meta-steps changed the weights
    assert again["sha256"] == meta["sha256"]  # seeded: the same command gives the same weights


def test_shipped_default_rule_loads_with_its_recorded_hash_and_provenance():
    from importlib import resources

    from lightning_meta.optim.pretrained import load_pretrained
    from lightning_meta.optim.rules import get_rule

    folder = resources.files("lightning_meta.optim").joinpath("pretrained")
    meta = json.loads(folder.joinpath("celo2.json").read_text())
    state = torch.load(io.BytesIO(folder.joinpath("celo2.pt").read_bytes()), weights_only=True)
    rule = load_pretrained("default")
    assert rule_hash(rule) == meta["sha256"]
    assert all(torch.equal(state[k], v) for k, v in rule.state_dict().items())
    # chosen by the validation protocol among recorded candidates, each with its hash (and command if trained)
    selection = meta["selection"]
    chosen = selection["candidates"][selection["chosen"]]
    assert chosen["sha256"] == meta["sha256"]
    assert selection["summary"][selection["chosen"]]["diverged_runs"] == 0
    assert all("command" in c for c in selection["candidates"].values() if c["meta_steps"] > 0)
    if meta["meta_steps"] == 0:  # the shipped default is the rule's own initialisation
        assert rule_hash(get_rule("celo2")) == meta["sha256"]


def test_every_shipped_entry_loads_with_its_hash_and_the_meta_trained_one_differs_from_the_default() -> None:
    from lightning_meta.optim import load_pretrained, rule_hash
    from lightning_meta.optim.pretrained import available_pretrained

    names = available_pretrained()
    assert {"default", "celo2", "celo2-pes"} <= set(names)
    rules = {name: load_pretrained(name) for name in names}  # each checks its recorded sha256
    assert rule_hash(rules["default"]) == rule_hash(rules["celo2"])
    assert rule_hash(rules["celo2-pes"]) != rule_hash(rules["celo2"])  # meta-trained: not the initialisation


_RESUME_ARGV = [
    "--rule",
    "celo2",
    "--families",
    "mlp,gru_lm",
    "--num-tasks",
    "2",
    "--truncation-length",
    "3",
    "--min-horizon",
    "5",
    "--max-horizon",
    "12",
    "--eval-tasks",
    "1",
    "--no-progress-bar",
]


def _weights(folder):
    return torch.load(folder / "celo2.pt", weights_only=True)


def test_pretrain_resumed_from_its_checkpoint_equals_one_uninterrupted_run(tmp_path):
    """7 meta-steps in one go == 4 steps (checkpoint), resume, 3 more: the estimators' inner problems (which
    straddle the split: horizons 5-12, truncations of 3), PES perturbations, RNG and meta-optimizer come back."""
    from lightning_meta.optim.meta.pretrain import main

    main([*_RESUME_ARGV, "--steps", "7", "--out", str(tmp_path / "once")])
    main([*_RESUME_ARGV, "--steps", "4", "--checkpoint-every", "2", "--out", str(tmp_path / "parts")])
    checkpoint = tmp_path / "parts" / "celo2.ckpt"
    saved = torch.load(checkpoint, weights_only=True)  # plain tensors and numbers
    assert saved["global_step"] == 4 and saved["meta_training"]["estimators"][0]["inner"]["step"] > 0
    first = _weights(tmp_path / "parts")
    main(
        [
            *_RESUME_ARGV,
            "--steps",
            "7",
            "--checkpoint-every",
            "2",
            "--resume",
            str(checkpoint),
            "--out",
            str(tmp_path / "parts"),
        ]
    )
    once, parts = _weights(tmp_path / "once"), _weights(tmp_path / "parts")
    assert any(not torch.equal(first[k], parts[k]) for k in parts)  # the resumed part trained
    for k in once:
        assert torch.equal(once[k], parts[k]), k
    meta = json.loads((tmp_path / "parts" / "celo2.json").read_text())
    assert meta["meta_steps"] == 7 and len(meta["parts"]) == 2
    assert meta["reproduce"].endswith("--steps 7") and "--resume" not in meta["reproduce"]
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 7  # written again at the end
    with pytest.raises(ValueError, match="sigma: 0.01 in the checkpoint, 0.02 now"):
        main([*_RESUME_ARGV, "--sigma", "0.02", "--steps", "9", "--resume", str(checkpoint), "--out", str(tmp_path)])


def test_pretrain_stops_on_sigterm_with_its_checkpoint_and_files_written(tmp_path, monkeypatch):
    import os
    import signal

    from lightning_meta.optim.meta import pretrain

    class SignalAtStep2(pretrain._RunControl):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(pretrain, "_RunControl", SignalAtStep2)
    argv = [*_RESUME_ARGV, "--families", "mlp", "--steps", "50", "--checkpoint-every", "100"]
    meta = json.loads(pretrain.main([*argv, "--out", str(tmp_path)]).read_text())
    assert meta["meta_steps"] == 2 and meta["stopped_by_signal"] == signal.SIGTERM
    assert torch.load(tmp_path / "celo2.ckpt", weights_only=True)["global_step"] == 2
