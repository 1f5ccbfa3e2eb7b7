"""fp32 linear layers on CPU: MKL (``F.linear``, PyTorch's default) against oneDNN on a
weight packed once (what ``decode.prepack`` uses) and MKL's own packed GEMM, for the
shapes of beam search with the small model (rows = sentences x beam).

    python scripts/bench_linear.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from transformer.model.kernels import linear_on_packed, pack_weight

SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 8000)]  # (in, out)


def ms_per_call(fn: Callable[[], torch.Tensor], repeat: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1350, 600, 200])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.threads} threads, fp32\n")
    print("| rows x in -> out | MKL F.linear ms | oneDNN packed ms | MKL packed ms | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for rows in args.rows:
            for d_in, d_out in SHAPES:
                x, w, b = torch.randn(rows, d_in), torch.randn(d_out, d_in) * 0.05, torch.randn(d_out)
                onednn_w = pack_weight(w)
                mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                plain = lambda x=x, w=w, b=b: F.linear(x, w, b)  # noqa: E731
                onednn = lambda x=x, p=onednn_w, b=b: linear_on_packed(x, p, b)  # noqa: E731
                mkl = lambda x=x, p=mkl_w, w=w, b=b, r=rows: torch.ops.mkl._mkl_linear(x, p, w, b, r)  # noqa: E731
                diff = float((plain() - onednn()).abs().max())
                times = [ms_per_call(f, args.repeat) for f in (plain, onednn, mkl)]
                print(f"| {rows} x {d_in} -> {d_out} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
