"""Load time of the restricted dataset unpickler against plain ``pickle.load`` (same bytes, in memory).

Two payloads shaped like the released files, scaled down: a tieredImageNet-like list of PNG-sized byte
strings (many small objects: the worst case for per-object overhead) and a miniImageNet-like uint8 array
(one large buffer). Prints the median of ``--repeats`` loads of each and the ratio restricted / plain.

    nice -n 10 python benchmarks/bench_safe_pickle.py --items 50000 --images 3000
"""

from __future__ import annotations

import argparse
import io
import pickle
import statistics
import time

import numpy as np

from lightning_meta.datamodules.safe_pickle import load_dataset_pickle


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=50_000, help="PNG-like byte strings in the list payload")
    ap.add_argument("--images", type=int, default=3_000, help="84x84x3 images in the array payload")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pngs = [rng.integers(0, 256, 2000, dtype=np.uint8).tobytes() for _ in range(args.items)]
    payloads = {
        f"list of {args.items} x 2 KB bytes (py3, protocol 4)": pickle.dumps(pngs, protocol=4),
        f"list of {args.items // 5} uint8 arrays (py3, protocol 2)": pickle.dumps(
            [np.frombuffer(p, np.uint8) for p in pngs[: args.items // 5]], protocol=2
        ),
        f"dict with uint8 [{args.images}, 84, 84, 3] (protocol 4)": pickle.dumps(
            {"image_data": rng.integers(0, 256, (args.images, 84, 84, 3), dtype=np.uint8), "class_dict": {}},
            protocol=4,
        ),
    }
    for name, blob in payloads.items():
        plain = median_seconds(lambda blob=blob: pickle.load(io.BytesIO(blob), encoding="latin1"), args.repeats)
        safe = median_seconds(lambda blob=blob: load_dataset_pickle(io.BytesIO(blob), "bench"), args.repeats)
        print(
            f"{name}: {len(blob) / 1e6:.0f} MB, pickle.load {plain:.3f} s, restricted {safe:.3f} s, ratio {safe / plain:.2f}"
        )


if __name__ == "__main__":
    main()
