"""onnxruntime (CPU) vs PyTorch eager for one view of the full-size generator, and export parity.

    python bench/export_bench.py [--config ffhq512-128] [--neural-res 64 128] [--threads 2] [--repeats 3]

Random weights (timing and parity do not depend on the training). For each neural rendering
resolution: export the ONNX graph (batch 1, fp32) with `my3dgen_cli.use.export.export_onnx`, which
also checks it against PyTorch (max abs diff on two views), then time one view in PyTorch eager
(the default inference path: fused modulated conv, deterministic sampling) and in onnxruntime,
both with the same number of threads, alternating the two (a shared machine loads both alike);
the median (and min) of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from my3dgen_cli.eg3d import build_generator  # noqa: E402
from my3dgen_cli.use.export import check_inputs, export_onnx  # noqa: E402


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each fn once to warm up, then `repeats` rounds of all of them in turn (shared machines:
    alternating keeps both sides under the same load). Returns the times of each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (allocations, onnxruntime's first-run planning)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_one(G: torch.nn.Module, nrr: int, threads: int, repeats: int, folder: Path) -> dict[str, float]:
    import onnxruntime as ort

    G.neural_rendering_resolution = nrr
    path = folder / f"g{nrr}.onnx"
    t0 = time.perf_counter()
    check = export_onnx(G, path, tolerance=None)
    export_s = time.perf_counter() - t0
    ws, camera = check_inputs(G, (1,))[0]

    def eager() -> None:
        with torch.no_grad():
            G.synthesis(ws, camera, neural_rendering_resolution=nrr, noise_mode="const", sampling="deterministic")

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"ws": ws.numpy(), "camera": camera.numpy()}
    times = interleaved_times({"torch": eager, "ort": lambda: session.run(None, feeds)}, repeats)
    t_torch, t_ort = statistics.median(times["torch"]), statistics.median(times["ort"])
    return {"nrr": nrr, "torch_s": t_torch, "ort_s": t_ort, "ratio": t_ort / t_torch,
            "torch_min": min(times["torch"]), "ort_min": min(times["ort"]),
            "max_abs_diff": check.max_abs_diff, "size_mib": path.stat().st_size / 2**20, "export_s": export_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ffhq512-128")
    parser.add_argument("--neural-res", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    G = build_generator(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nrr in args.neural_res:
            rows.append(bench_one(G, nrr, args.threads, args.repeats, Path(tmp)))
            print(f"done nrr {nrr}", file=sys.stderr, flush=True)
    import onnxruntime

    print(f"{args.config}, random weights, one view (batch 1), CPU, {args.threads} threads; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"median (min) of {args.repeats} interleaved runs after one warm-up")
    print("| nrr | PyTorch eager (s) | onnxruntime (s) | ort / torch | max abs diff | file (MiB) | export (s) |")
    print("|----:|------------------:|----------------:|------------:|-------------:|-----------:|-----------:|")
    for r in rows:
        print(f"| {r['nrr']} | {r['torch_s']:.2f} ({r['torch_min']:.2f}) | {r['ort_s']:.2f} ({r['ort_min']:.2f}) "
              f"| {r['ratio']:.2f} | {r['max_abs_diff']:.1e} | {r['size_mib']:.1f} | {r['export_s']:.0f} |")


if __name__ == "__main__":
    main()
