"""The GPU memory attribution and the summary of ``benchmarks/bench_maml_throughput.py`` (in its harness module,
``benchmarks/maml_harness.py``), on synthetic allocator traces and worker rows.

The benchmark runs it on a GPU only; the replay itself is plain Python over the snapshot format of
``torch.cuda.memory._snapshot()``, so its arithmetic is checked here.
"""

from __future__ import annotations

import argparse

import pytest

from benchmarks.maml_harness import peak_composition, summarise

MIB = 2**20


def _frames(user_line: int, op: str) -> list[dict]:
    # innermost first, as the allocator records them
    return [
        {"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": op},
        {"filename": "/x/lightning_meta/functional/adaptation.py", "line": user_line, "name": "adapt"},
    ]


def _ev(action: str, addr: int, mib: float, frames: list[dict] | None = None) -> dict:
    return {"action": action, "addr": addr, "size": int(mib * MIB), "frames": frames or []}


def test_peak_composition_reports_the_blocks_live_at_the_peak() -> None:
    trace = [
        _ev("alloc", 1, 10, _frames(5, "conv2d")),
        _ev("alloc", 2, 40, _frames(5, "conv2d")),  # a transient workspace under the same line
        _ev("free_requested", 2, 40),
        _ev("free_completed", 2, 40),
        _ev("alloc", 3, 20, _frames(9, "relu")),
        _ev("alloc", 4, 20, _frames(9, "relu")),
        _ev("alloc", 5, 25, _frames(5, "conv2d")),  # peak here: 10 + 20 + 20 + 25 = 75 MiB
        _ev("free_requested", 5, 25),
        _ev("free_requested", 3, 20),
        _ev("alloc", 6, 30, _frames(9, "relu")),  # 60: below the peak
        _ev("segment_alloc", 7, 100),  # not a tensor block
    ]
    parts = peak_composition({"device_traces": [trace]}, 0, base_bytes=32 * MIB)
    assert parts["before_mib"] == pytest.approx(32)
    # the 40 MiB block was freed before the peak (50 MiB at that moment), so the peak is the later 75 MiB set
    assert parts["window_peak_mib"] == pytest.approx(75)
    assert parts["blocks_at_peak"] == 4
    assert parts["largest_blocks_mib"] == pytest.approx([25, 20, 20, 10])
    sites = {where: (mib, n, largest) for where, mib, n, largest in parts["by_site_mib"]}
    assert sites["adaptation.py:5 adapt > conv2d"] == pytest.approx((35, 2, 25))
    assert sites["adaptation.py:9 adapt > relu"] == pytest.approx((40, 2, 20))
    assert [w for w, *_ in parts["by_site_mib"]][0] == "adaptation.py:9 adapt > relu"  # largest group first


def test_peak_composition_of_a_trace_without_user_frames() -> None:
    trace = [
        _ev("alloc", 1, 3, [{"filename": "/x/torch/autograd/graph.py", "line": 8, "name": "_engine_run_backward"}]),
        _ev("alloc", 2, 1),
    ]
    parts = peak_composition({"device_traces": [[], trace]}, 1, base_bytes=0)
    assert parts["window_peak_mib"] == pytest.approx(4)
    assert {w for w, *_ in parts["by_site_mib"]} == {"(no python frame) > _engine_run_backward", "(no python frame)"}


def test_memory_ratio_less_blas_workspace_is_reported_beside_the_full_ratio() -> None:
    def row(impl: str, peak: float, ws: float, rate: float) -> dict:
        return {
            "impl": impl,
            "config": "so1",
            "round": 0,
            "tasks_per_s": rate,
            "median_iter_s": 32 / rate,
            "tasks_per_cpu_s": rate,
            "peak_growth_mib": 0.0,
            "gpu_peak_mib": peak,
            "gpu_reserved_mib": peak + 8,
            "gpu_blas_ws_mib": ws,
            "live_peak_mib": None,
            "rss_import_mib": 1.0,
            "rss_setup_mib": 1.0,
            "flops": None,
            "first_loss": 1.0,
            "mode": "loop",
        }

    args = argparse.Namespace(device="cuda", configs=["so1"], impls=["l2l", "ours-loop-g"], rounds=1, threads=1)
    summary = summarise([row("l2l", 142.0, 32.0, 70.0), row("ours-loop-g", 120.0, 64.0, 350.0)], {1: [1.0]}, args)
    ours = summary["configs"]["so1"]["ours-loop-g"]
    assert ours["peak_mem_vs_l2l"] == pytest.approx(120 / 142)
    # learn2learn's workspace comes out of both sides; the 32 MiB more that ours holds (a second stream's) stays
    assert ours["peak_less_blas_ws_vs_l2l"] == pytest.approx((120 - 32) / (142 - 32))
    assert ours["speedup_vs_l2l"] == pytest.approx(5.0)
