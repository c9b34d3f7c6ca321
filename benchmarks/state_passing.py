"""Chunked state passing against one long convolution: what the layers pay past STATE_PASSING_LEN.

    python3 -m benchmarks.state_passing [--lengths 4096 16384] [--chunks 8192 4096 2048]

A diagonal SSM (H channels, N/2 = 32 complex modes, S4D-Lin initialisation with dt log-uniform
in [1e-3, 1e-1], bilinear, B = 1) convolved with its input, forward + backward to every
parameter: "full" is kernels.fftconv of the length-L filter from kernels.s4d_kernel, "T=..." is
kernels.ssm_chunked_conv with chunks of T (chunks >= L are skipped: that is the full path).
Timed in turn, in an order shuffled each repeat, after one warm-up; medians of --repeats, 1
thread by default. "vs full" is the time relative to the full path, taken within each round,
its median over rounds (time_round_robin's paired ratio: a slow spell cancels out of it).
Table to stdout, JSON to benchmarks/results/state_passing_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.fftconv import RESULTS, positive_int, run_options, time_round_robin, write_results
from kernels import fftconv, s4d_kernel, ssm_chunked_conv


def ssm_case(H: int, N: int, L: int, chunk: int | None):
    """A zero-argument callable: one forward of the SSM convolution (chunked if ``chunk``),
    its output summed, so that time_round_robin's backward reaches every parameter."""
    g = torch.Generator().manual_seed(0)
    log_dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1), generator=g)
    dt = log_dt.exp().requires_grad_()
    A = torch.complex(-0.5 * torch.ones(H, N), math.pi * torch.arange(N).float().expand(H, N))
    A.requires_grad_()
    C = torch.randn(H, N, dtype=torch.cfloat, generator=g).requires_grad_()
    D = torch.randn(H, generator=g).requires_grad_()
    u = torch.randn(1, H, L, generator=g).requires_grad_()
    if chunk is None:
        return lambda: fftconv(u, s4d_kernel(dt, A, None, C, L, "bilinear"), D)
    return lambda: ssm_chunked_conv(u, dt, A, None, C, D, chunk, "bilinear")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 16384])
    p.add_argument("--chunks", type=positive_int, nargs="+", default=[8192, 4096, 2048])
    p.add_argument("--channels", type=positive_int, default=128)
    run_options(p, repeats=7, out=RESULTS / "state_passing_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, rows = time.perf_counter(), []
    for L in args.lengths:
        fns = {"full": ssm_case(args.channels, 32, L, None)}
        fns |= {f"T={T}": ssm_case(args.channels, 32, L, T) for T in args.chunks if T < L}
        times = time_round_robin(fns, True, args.repeats, "cpu", baseline="full")
        rows += [{"L": L, "impl": name, **t} for name, t in times.items()]
    table = Table(title=f"fwd+bwd median ms, H={args.channels}, 32 modes, B=1")
    for col in ("L", "impl", "ms", "vs full"):
        table.add_column(col, justify="right")
    for r in rows:
        ratio = f"{1 / r['speedup']:.2f}x"
        table.add_row(str(r["L"]), r["impl"], f"{r['median_ms']:.1f}", ratio)
    Console().print(table)
    fields = {"channels": args.channels, "modes": 32, "repeats": args.repeats}
    write_results(args.out, "cpu", args.threads, start, rows, **fields)


if __name__ == "__main__":
    main()
