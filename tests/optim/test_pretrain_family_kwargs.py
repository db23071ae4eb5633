"""pretrain's --family-kwargs: parsing, clear errors, and a record that --resume checks like any other setting."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_meta.optim.meta.pretrain import main, parse_args, parse_family_kwargs

_FAMILIES = ["mlp", "teacher_student", "gru_lm", "transformer_lm"]


def test_family_kwargs_parse_numbers_tuples_booleans_and_text():
    items = [
        "mlp:widths=16,128",
        "mlp:depths=1,4",
        "mlp:noise=0.5",
        "mlp:hidden=64,",
        "teacher_student:batch_sizes=16",
        "transformer_lm:layers=2",
        "transformer_lm:tied=false",
        "transformer_lm:ff=none",
        "gru_lm:corpus=held-aside",
    ]
    assert parse_family_kwargs(items, _FAMILIES) == {
        "mlp": {"widths": (16, 128), "depths": (1, 4), "noise": 0.5, "hidden": (64,)},
        "teacher_student": {"batch_sizes": 16},
        "transformer_lm": {"layers": 2, "tied": False, "ff": None},
        "gru_lm": {"corpus": "held-aside"},
    }
    args = parse_args(
        ["--steps", "1", "--families", "mlp,conv", "--family-kwargs", "mlp:widths=8,32", "conv:classes=20"]
    )
    assert args.family_kwargs == {"mlp": {"widths": (8, 32)}, "conv": {"classes": 20}}
    assert parse_args(["--steps", "1"]).family_kwargs == {}


def test_rule_kwargs_parse_values_as_family_kwargs_do(capsys):
    args = parse_args(
        [
            "--steps",
            "1",
            "--rule-kwargs",
            "step_size=prodigy",
            "prodigy_d0=0.1",
            "warmup_steps=0",
            "foo=none",
            "bar=true",
            "sizes=1,2",
        ]
    )
    assert args.rule_kwargs == {
        "step_size": "prodigy",
        "prodigy_d0": 0.1,
        "warmup_steps": 0,
        "foo": None,
        "bar": True,
        "sizes": (1, 2),
    }
    assert type(args.rule_kwargs["warmup_steps"]) is int
    with pytest.raises(SystemExit):
        parse_args(["--steps", "1", "--rule-kwargs", "oops"])
    assert "--rule-kwargs 'oops' is not KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("cifar:classes=10", r"no task family 'cifar'; choose one of \[.*'transformer_lm'"),
        ("mlp:width=16,128", r"'mlp' takes no 'width'; it takes .*batch_sizes, .*widths"),
        ("conv:classes=10", "'conv' is not in --families mlp,transformer_lm"),
        ("mlp=widths=3", "is not FAMILY:KEY=VALUE"),
    ],
)
def test_bad_family_kwargs_are_refused_naming_the_valid_choices(item, message, capsys):
    with pytest.raises(ValueError, match=message):
        parse_family_kwargs([item], ["mlp", "transformer_lm"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "1", "--families", "mlp,transformer_lm", "--family-kwargs", item])
    assert "--family-kwargs" in capsys.readouterr().err


_ARGV = [
    "--rule",
    "celo2",
    "--families",
    "mlp,transformer_lm",
    "--num-tasks",
    "2",
    "--truncation-length",
    "2",
    "--min-horizon",
    "4",
    "--max-horizon",
    "4",
    "--eval-tasks",
    "1",
    "--no-progress-bar",
]


def test_family_kwargs_reach_the_run_its_record_and_a_resume_with_others_is_refused(tmp_path):
    kwargs = ["--family-kwargs", "mlp:widths=8,16", "mlp:batch_sizes=4,8", "transformer_lm:seq_len=8"]
    out = tmp_path / "run"
    meta = json.loads(main([*_ARGV, *kwargs, "--steps", "2", "--checkpoint-every", "2", "--out", str(out)]).read_text())
    recorded = {"mlp": {"widths": [8, 16], "batch_sizes": [4, 8]}, "transformer_lm": {"seq_len": 8}}
    assert meta["meta_training"]["family_kwargs"] == recorded
    checkpoint = torch.load(out / "celo2.ckpt", weights_only=True)
    assert checkpoint["pretrain"]["settings"]["family_kwargs"] == recorded
    assert checkpoint["hyper_parameters"]["family_kwargs"]["transformer_lm"] == {"seq_len": 8}
    # the families were built with them: the running populations have the drawn sizes and 8-character windows
    inner = [est["inner"]["params"] for est in checkpoint["meta_training"]["estimators"]]
    assert 8 <= inner[0]["w0"].shape[-1] <= 16 and inner[1]["pos"].shape[-2] == 8

    resume = [*_ARGV, "--steps", "3", "--resume", str(out / "celo2.ckpt"), "--out", str(out)]
    with pytest.raises(ValueError, match=r"family_kwargs: .*'widths': \[8, 16\].* in the checkpoint, .*\[8, 32\]"):
        main([*resume, "--family-kwargs", "mlp:widths=8,32", "mlp:batch_sizes=4,8", "transformer_lm:seq_len=8"])
    with pytest.raises(ValueError, match=r"family_kwargs: .* in the checkpoint, \{\} now"):
        main(resume)
    same = ["--family-kwargs", "transformer_lm:seq_len=8", "mlp:batch_sizes=4,8", "mlp:widths=8,16"]
    meta = json.loads(main([*resume, *same]).read_text())  # the same kwargs, given in another order, resume
    assert meta["meta_steps"] == 3 and len(meta["parts"]) == 2


def test_a_checkpoint_written_before_family_kwargs_existed_resumes_without_them(tmp_path):
    from lightning_meta.optim.meta import pretrain

    out = tmp_path / "run"
    argv = [*_ARGV, "--families", "mlp", "--steps", "1", "--checkpoint-every", "1", "--out", str(out)]
    main(argv)
    path = out / "celo2.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["pretrain"]["settings"]["family_kwargs"]  # as written by the previous version
    torch.save(checkpoint, path)
    settings = pretrain._settings(parse_args([*argv, "--resume", str(path)]))
    assert pretrain._load_resume(str(path), settings)["settings"] == checkpoint["pretrain"]["settings"]
    with pytest.raises(ValueError, match=r"family_kwargs: \{\} in the checkpoint"):
        pretrain._load_resume(str(path), {**settings, "family_kwargs": {"mlp": {"widths": [8, 16]}}})
