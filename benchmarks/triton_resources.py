"""Shared memory, registers and spills of every fused FFT kernel variant, compiled for an H100
without one.

    python3 -m benchmarks.triton_resources [--sizes 8192 16384] [--dtypes bf16] [--jobs 2]
    python3 -m benchmarks.triton_resources --plan 2048:32,64,32,32,4,4 --dtypes bf16  # a variant

Every variant that kernels.fft_triton.TritonFFTConv launches (FFT sizes 256 .. FUSED_CAPACITY;
fp32, fp16 and bf16 inputs; the flag sets of the forward kernel's three uses, of the unfused
backward's filter-gradient kernel and of the fused backward kernel, at every size) is compiled
by triton.compile for target sm_90 (CUDA capability 9.0) with the plan's warp count and
pipelining depth, specialised as the launcher would: pointer arguments 16-byte aligned, and L,
K, H either multiples of 16 ("aligned", e.g. power-of-two lengths) or not (masked loads then
vectorize less). Shared memory is the compiled kernel's own figure;
registers per thread and spill bytes come from the bundled ptxas -v on its PTX (the call
Triton makes: -lineinfo --gpu-name=sm_90a). A launch needs shared <= 232448 bytes (227 KiB,
the H100's per-block limit); spills go to local memory (slow, not fatal). The compiler is the
installed Triton's (a GPU session may use another version). About 15 minutes on 2 cores. The
table goes to stdout, everything to JSON (default
benchmarks/results/triton_resources_sm90.json). ``--plan N:n1,n2,S,C,warps[,rows]`` compiles
that plan for size N instead of PLANS[N] (for every dtype; repeat it for more plans, of one
size or several), e.g. to see what more batch rows per program cost before a GPU session
times them; its JSON then goes to triton_resources_sm90_plans.json unless --out says.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from rich.console import Console
from rich.table import Table
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.fftconv import RESULTS, json_path, write_json
from kernels import fft_triton

H100_SHARED = 232448  # bytes of shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZES = [256 << i for i in range(7)]
assert SIZES[-1] == fft_triton.FUSED_CAPACITY
_GATE_FLAGS = ("HAS_PRE", "HAS_POST", "NEED_PRE", "NEED_POST")
# The flag sets TritonFFTConv launches. _forward_kernel: the forward pass and dpostgate
# (HAS_GIN: pregate given; HAS_GOUT: postgate given, or gy), and dv (CONJ; HAS_GIN: postgate
# given; du alone: HAS_GOUT = pregate given; dpregate alone: HAS_GOUT; both: HAS_GOUT, OUT2).
# _backward_kernel: pregate / postgate given.
FLAGS = {
    "forward": [
        {"HAS_GIN": gin, "HAS_GOUT": gout, "OUT2": out2, "CONJ": conj}
        for gin in (False, True)
        for conj, gout, out2 in [
            *((False, gout, False) for gout in (False, True)),
            *((True, gout, out2) for gout, out2 in ((False, False), (True, False), (True, True))),
        ]
    ],
    "backward": [
        {"HAS_PRE": pre, "HAS_POST": post} for pre in (False, True) for post in (False, True)
    ],
    # _fused_backward_kernel (_GATE_FLAGS all on or all off): gates and every gradient (an H3
    # layer's case), no gates (u and k, a plain SSM), and a frozen filter (no dk).
    "fused_backward": [
        dict(NEED_U=True, NEED_K=need_k, **dict.fromkeys(_GATE_FLAGS, gates))
        for gates, need_k in ((True, True), (False, True), (True, False))
    ],
}
_FP32_POINTERS = {"k_ptr", "mats_ptr", "gk_ptr"}  # the rest hold the input dtype
_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_variant(
    kernel: str, n: int, dtype: str, flags: dict, aligned: bool = True, spec: tuple | None = None
) -> dict:
    """Compile one variant for sm_90 with the plan for size n (or ``spec``, a PLANS entry);
    its resources as a row (an "error" entry if it fails)."""
    fn = getattr(fft_triton, f"_{kernel}_kernel")
    p = fft_triton.plan(n, DTYPES[dtype], spec)
    constexprs = fft_triton._launch_options(p, DTYPES[dtype]) | flags
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages")}
    constexprs["R"] = p.rows
    if kernel == "backward":  # its batch loop's constexpr bound
        constexprs["RB"] = max(fft_triton.DK_ROWS, p.rows)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if aligned and name in ("L", "K", "H"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    row = {"kernel": kernel, "n": n, "dtype": dtype, **flags, "aligned": aligned}
    row |= {"n1": p.n1, "n2": p.n2, "S": p.S, "C": p.C, "warps": p.warps, "stream": p.stream}
    row["rows"] = p.rows
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
        return row | {"error": repr(e)[:500]}
    row |= {"shared": compiled.metadata.shared, **ptxas_usage(compiled.asm["ptx"])}
    row["fits"] = row["shared"] <= H100_SHARED
    row["compile_s"] = round(time.perf_counter() - start, 1)
    return row


def plan_spec(text: str) -> tuple[int, tuple[int, ...]]:
    """A --plan entry N:n1,n2,S,C,warps[,rows] as (N, plan); a bad one is argparse's one-line
    error (exit 2)."""
    n, _, values = text.partition(":")
    parts = values.split(",")
    ok = n in map(str, SIZES) and len(parts) in (5, 6) and all(v.isdigit() for v in parts)
    if ok:
        n1, n2, S, C, _, *rows = spec = tuple(map(int, parts))
        ok = S > 0 and C > 0 and n1 * n2 == int(n) and n1 % S == n1 % C == 0
        ok = ok and all(r >= 1 and not r & (r - 1) for r in rows)  # powers of two
    if ok:
        try:
            fft_triton.plan(int(n), torch.bfloat16, spec)
        except ValueError as e:  # a plan the kernels refuse to launch
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if not ok:
        raise argparse.ArgumentTypeError(
            f"expected N:n1,n2,S,C,warps[,rows] with N in {SIZES}, n1 * n2 = N, S and C "
            f"dividing n1, rows a power of two; got {text!r}"
        )
    return int(n), spec


def ptxas_usage(ptx: str) -> dict:
    """registers, stack frame and spill bytes from ptxas -v for sm_90a."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [_PTXAS, "-lineinfo", "-v", "--gpu-name=sm_90a", src, "-o", Path(d) / "k.cubin"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", log)
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "stack": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def print_table(rows: list[dict], console: Console) -> None:
    """Per kernel, size and dtype: the worst variant's shared memory, registers and spill bytes
    (stores + loads), the latter for aligned and unaligned lengths."""
    table = Table(title="fused FFT kernels on sm_90, worst over flag sets (limit 232448 B)")
    cols = ("kernel", "n", "dtype", "n1xn2", "warps", "shared B", "regs", "spill B", "unal. B")
    for col in cols:
        table.add_column(col, justify="right")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # one group per plan too: --plan may give several for one size
        plan = tuple(r[k] for k in ("n1", "n2", "S", "C", "warps", "rows"))
        groups.setdefault((r["kernel"], r["n"], r["dtype"], plan), []).append(r)
    for (kernel, n, dtype, _), group in groups.items():
        ok = [r for r in group if "error" not in r]
        if len(ok) < len(group):
            table.add_row(kernel, str(n), dtype, *[""] * 5, "compile error")
            continue
        shared = max(r["shared"] for r in ok)
        spills = [
            max((r["spill_stores"] + r["spill_loads"] for r in ok if r["aligned"] == a), default=0)
            for a in (True, False)
        ]
        r = ok[0]
        table.add_row(
            kernel, str(n), dtype, f"{r['n1']}x{r['n2']}", str(r["warps"]),
            f"[{'green' if shared <= H100_SHARED else 'red'}]{shared}",
            str(max(x["registers"] for x in ok)),
            *(f"[{'red' if spill else 'green'}]{spill}" for spill in spills),
        )  # fmt: skip
    console.print(table)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, choices=SIZES, metavar="N")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--kernels", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--plan", type=plan_spec, action="append", default=[], metavar="N:PLAN",
                   help="compile this plan for size N, e.g. 2048:32,64,32,32,4,4")  # fmt: skip
    p.add_argument("--out", type=json_path, default=None,
                   help="JSON path (default results/triton_resources_sm90.json, or "
                        "..._plans.json with --plan: a few plans must not replace every "
                        "size's figures)")  # fmt: skip
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")  # exit 2, one line
    name = "triton_resources_sm90_plans.json" if args.plan else "triton_resources_sm90.json"
    out = args.out or RESULTS / name
    # (N, plan or None for PLANS[N]); several --plan entries for one N are all compiled.
    plans = args.plan or [(n, None) for n in args.sizes]
    start = time.perf_counter()
    jobs = [
        (kernel, n, dtype, flags, aligned, spec)
        for kernel in args.kernels
        for n, spec in plans
        for dtype in args.dtypes
        for flags in FLAGS[kernel]
        for aligned in (True, False)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_variant, *zip(*jobs)))
    print_table(rows, Console())
    payload = {
        "triton": triton.__version__,
        "target": "cuda sm_90 (ptxas --gpu-name=sm_90a)",
        "shared_limit": H100_SHARED,
        # [N, (n1, n2, S, C, warps[, rows])] pairs
        "plans": [[n, spec or fft_triton.PLANS[n]] for n, spec in plans],
        "num_stages": fft_triton._NUM_STAGES,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    write_json(payload, out)


if __name__ == "__main__":
    main()
