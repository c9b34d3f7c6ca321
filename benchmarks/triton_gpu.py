"""The Triton fftconv kernels on a CUDA device: accuracy, compile resources, tuning alternatives.

    python3 -m benchmarks.triton_gpu [--quick] [--out FILE]

1. Device ceilings: a device-to-device copy (bytes read + written per second) and a bf16 matmul.
2. Accuracy against a float64 reference computed by torch on the same device (rfft of the
   zero-padded signal and filter: a different algorithm from the kernels' matrix DFTs), for the
   output and every gradient, as ||got - ref|| / ||ref||, on fresh random inputs, with the
   allocator's free memory poisoned with NaN first so that an unwritten output shows.
3. Registers, spills and shared memory of every compiled kernel variant.
4. Speed of tuning alternatives of kernels.fft_triton (whole plans for PLANS, DOT_PRECISION,
   NUM_WARPS) at B=16, H=768, bf16, K=L: forward and forward + backward medians
   (triton.testing.do_bench), with the torch backend and causal SDPA (heads of 64) beside
   them, and the forward's bytes (u, two gates read, y written) per second as a fraction of
   the measured copy.

The table goes to stdout, everything to JSON (default benchmarks/results/triton_gpu.json).
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch
import triton
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from triton.testing import do_bench

from benchmarks.fftconv import RESULTS, json_path, machine_info, make_case, write_json
from kernels import fft_triton, fftconv, toeplitz_triton


def ceilings() -> dict:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    x = torch.randn(2**28, device="cuda")  # 1 GiB: far past L2
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ a, return_mode="median")
    return {"copy_GBps": 2 * x.nbytes / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def reference(u, k, D, pre, post):
    """float64 causal convolution by torch's rfft at a power of two >= L + K - 1."""
    L, K = u.shape[-1], k.shape[-1]
    n = 1 << (L + K - 1).bit_length()
    v = u * pre
    z = torch.fft.irfft(torch.fft.rfft(v, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return (z + D[:, None] * v) * post


def poison_free_memory() -> None:
    """Fill the caching allocator's free blocks with NaN: an output the kernel skips stays NaN.
    Both pools: requests of up to 1 MiB (every output and gradient of the accuracy cases, B=2,
    H=8) come from the allocator's small pool of 2 MiB segments, never from a big block."""
    free = torch.cuda.mem_get_info()[0]
    blob = torch.full((min(free // 8, 2**30),), float("nan"), device="cuda")
    del blob
    small = [torch.full((2**18,), float("nan"), device="cuda") for _ in range(512)]  # 1 MiB each
    del small


def accuracy_case(method: str, L: int, K: int, dtype, B: int = 2, H: int = 8) -> dict:
    """Relative errors of the output and every gradient."""
    g = torch.Generator(device="cuda").manual_seed(L * 7919 + K)
    args64 = [
        torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)
        for s in ((B, H, L), (H, K), (H,), (B, H, L), (B, H, L))
    ]
    args64[1] /= K**0.5  # keep the output's scale near the input's
    args = [a.to(dtype).requires_grad_() for a in args64]
    ref_args = [a.detach().double().requires_grad_() for a in args]
    poison_free_memory()
    y = fftconv(*args, backend="triton", method=method)
    ref = reference(*ref_args)
    # The reference gets the same gy as the kernel, rounded to the inputs' dtype: otherwise
    # bf16's own rounding of gy (~1.7e-3) shows in every gradient's error.
    gy = torch.randn(y.shape, generator=g, device="cuda", dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, args, gy)
    want = torch.autograd.grad(ref, ref_args, gy.double())
    names = ("y", "du", "dk", "dD", "dpre", "dpost")
    errors = {}
    for name, a, b in zip(names, (y, *got), (ref, *want)):
        errors[name] = ((a.double() - b).norm() / b.norm()).item()
    return {"method": method, "L": L, "K": K, "dtype": str(dtype).split(".")[-1]} | errors


def kernel_resources() -> list[dict]:
    """n_regs, n_spills and shared bytes of every compiled variant of the kernels (best
    effort: the cache layout is a Triton internal)."""
    rows = []
    kernels = {
        "fft.forward": fft_triton._forward_kernel,
        "fft.backward": fft_triton._backward_kernel,
        "fft.fused_backward": fft_triton._fused_backward_kernel,
        "toeplitz.forward": toeplitz_triton._forward_kernel,
        "toeplitz.grad_signal": toeplitz_triton._grad_signal_kernel,
        "toeplitz.grad_filter": toeplitz_triton._grad_filter_kernel,
    }
    for name, fn in kernels.items():
        for cache in getattr(fn, "device_caches", {}).values():
            compiled = cache[0] if isinstance(cache, tuple) else cache
            for key, kernel in compiled.items():
                meta = getattr(kernel, "metadata", None)
                rows.append(
                    {
                        "kernel": name,
                        "key": str(key)[-160:],
                        "n_regs": getattr(kernel, "n_regs", None),
                        "n_spills": getattr(kernel, "n_spills", None),
                        "shared": getattr(meta, "shared", None),
                        "num_warps": getattr(meta, "num_warps", None),
                    }
                )
    return rows


def speed_row(L: int, variant: str, fn, backward: bool, copy_GBps: float, B=16, H=768) -> dict:
    def run():
        y = fn()
        if backward:
            y.float().sum().backward()

    ms = do_bench(run, warmup=50, rep=200, return_mode="median")
    row = {
        "L": L,
        "K": L,
        "B": B,
        "H": H,
        "variant": variant,
        "pass": "fwd_bwd" if backward else "fwd",
    }
    row["ms"] = ms
    if not backward:
        row["bandwidth_frac"] = 4 * B * H * L * 2 / ms / 1e6 / copy_GBps
    return row


def speed(variants: dict[int, list[str]], copy_GBps: float, rows: list, log) -> None:
    """At each L: the torch path, SDPA, and each variant of the fused kernel (forward; see
    VARIANTS), then the defaults' forward and forward + backward, and forward + backward with
    the other backward path ("fused+bwd" or "unfused+bwd": one launch or three, whichever
    FUSED_BACKWARD_MAX does not pick at this size); rows are appended to ``rows`` as they come
    (log saves them), so a run cut short keeps what it measured."""
    saved = (dict(fft_triton.DOT_PRECISION), fft_triton.NUM_WARPS, dict(fft_triton.PLANS))
    saved_max = fft_triton.FUSED_BACKWARD_MAX
    for L, specs in variants.items():
        base = {
            "torch": make_case("ours", 16, 768, L, L, torch.bfloat16, "cuda", backend="torch"),
            "sdpa": make_case("sdpa", 16, 768, L, L, torch.bfloat16, "cuda"),
        }
        for name, fn in base.items():
            for backward in (False, True):
                rows.append(speed_row(L, name, fn, backward, copy_GBps))
                log(rows[-1])
        del base
        # method "fft": at K <= TRITON_TOEPLITZ_MAX_TAPS (L = 256 here) the triton backend
        # picks the Toeplitz kernel, which every row of that L timed before this was named.
        ours = make_case(
            "ours", 16, 768, L, L, torch.bfloat16, "cuda", backend="triton", method="fft"
        )
        n = fft_triton.fft_size(L, L)
        other = "unfused" if n <= fft_triton.FUSED_BACKWARD_MAX else "fused"
        for spec in [*specs, "default", "default+bwd", f"{other}+bwd"]:
            if spec.endswith("fused+bwd"):
                fused = spec == "fused+bwd"
                fft_triton.FUSED_BACKWARD_MAX = fft_triton.FUSED_CAPACITY if fused else 0
            elif "," in spec:  # a whole plan for this size
                fft_triton.PLANS[n] = tuple(int(v) for v in spec.removesuffix("+bwd").split(","))
            elif not spec.startswith("default"):  # PRECISION:WARPS
                prec, warps = spec.split(":")
                fft_triton.DOT_PRECISION[torch.bfloat16] = prec
                fft_triton.NUM_WARPS = int(warps)
            try:
                row = speed_row(L, f"triton[{spec}]", ours, spec.endswith("bwd"), copy_GBps)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is data
                row = {"L": L, "variant": f"triton[{spec}]", "error": repr(e)[:300]}
            finally:
                fft_triton.DOT_PRECISION.update(saved[0])
                fft_triton.NUM_WARPS = saved[1]
                fft_triton.PLANS.update(saved[2])
                fft_triton.FUSED_BACKWARD_MAX = saved_max
            rows.append(row)
            log(row)


# Per L (K = L, so n = 2L): alternatives worth timing beside the default, "PRECISION:WARPS" or
# a whole plan "n1,n2,S,C,warps[,rows]" for kernels.fft_triton.PLANS (suffix "+bwd": forward +
# backward). Those timed so far, and what won, are in the comment above PLANS. Untimed yet:
# several batch rows per program (the sixth entry), the variants that compiled for sm_90 with
# few or no spills (benchmarks/results/triton_resources_sm90_rows.json).
# No 8-warp plan with n2 = 64 (kernels.fft_triton.plan refuses them): one crashed the H100
# process with an illegal memory access, which no later call in that process survives. Their
# 4-warp replacements compiled offline with tens to hundreds of bytes of spills per thread, but
# 4.8-7.7 KB at n = 2048 with 4 rows and 5.4-8.1 KB at n = 4096 with S = 64, which are left out
# (benchmarks/results/triton_resources_sm90_plans.json).
VARIANTS: dict[int, list[str]] = {
    256: ["32,16,16,32,4,4", "32,16,32,32,4,4", "32,16,16,32,4,8", "32,16,32,32,4,4+bwd"],
    512: ["16,64,16,16,4,2", "16,64,16,16,4,4", "16,64,16,16,4,2+bwd"],
    1024: ["32,64,32,32,4,2", "32,64,32,32,4,2+bwd"],
    2048: ["64,64,32,32,4,2"],
    4096: ["64,128,32,32,8,2"],
    8192: [],
}

# The fused kernel at n = 512 .. 16384, the blocked path (pieces of 16384), then Toeplitz.
ACCURACY = [("fft", L, K) for L, K in [(256, 256), (1000, 1000), (2048, 2048), (3000, 1000)]]
ACCURACY += [("fft", L, K) for L, K in [(5000, 3000), (4096, 4096), (8192, 8192)]]
ACCURACY += [("fft", 16384, 300), ("toeplitz", 4096, 256)]


def accuracy_spec(text: str) -> tuple[str, int, int]:
    """A --cases entry METHOD:L:K, e.g. fft:5000:3000, as ("fft", 5000, 3000); a bad one is
    argparse's one-line error (exit 2)."""
    method, *sizes = text.split(":")
    if method not in ("fft", "toeplitz") or len(sizes) != 2 or not all(s.isdigit() for s in sizes):
        raise argparse.ArgumentTypeError(f"expected fft|toeplitz:L:K, got {text!r}")
    return method, int(sizes[0]), int(sizes[1])


def part_of(cases: list, i: int, n: int) -> list:
    """Part i (1-based) of n contiguous parts of ``cases``, of sizes differing by at most one."""
    return cases[(i - 1) * len(cases) // n : i * len(cases) // n]


def part_spec(text: str) -> tuple[int, int]:
    """A --part entry I/N (1 <= I <= N) as (I, N)."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return int(i), int(n)


def speed_length(text: str) -> int:
    """A --lengths entry: the fused kernel's K = L, so 2L - 1 must fit FUSED_CAPACITY (an
    L of 16384 raised after the torch and SDPA rows, ending the run)."""
    top = (fft_triton.FUSED_CAPACITY + 1) // 2
    if not text.isdigit() or not 1 <= int(text) <= top:
        raise argparse.ArgumentTypeError(f"expected an L in 1 .. {top}, got {text!r}")
    return int(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lengths", type=speed_length, nargs="*", default=list(VARIANTS),
                   help="L = K of the speed part, 256 .. 8192 (none: no speed)")  # fmt: skip
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--cases", nargs="+", type=accuracy_spec, metavar="METHOD:L:K",
                   help="accuracy cases (default: all)")  # fmt: skip
    p.add_argument("--part", type=part_spec, metavar="I/N",
                   help="part I of N of the accuracy cases (ACCURACY in N runs of about equal "
                        "length, e.g. one per 10-minute call)")  # fmt: skip
    p.add_argument("--out", type=json_path, default=RESULTS / "triton_gpu.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device; none is available")  # exit 2, one line
    console, start = Console(), time.perf_counter()
    payload = {"machine": machine_info("cuda", torch.get_num_threads())}
    payload["triton"] = triton.__version__
    payload["ceilings"] = ceilings()
    console.print(payload)

    def save():
        payload["wall_s"] = time.perf_counter() - start
        write_json(payload, args.out)

    def log(row):
        console.print(row)
        save()

    payload["accuracy"] = []
    if not args.skip_accuracy:
        cases = args.cases or (ACCURACY[:3] if args.quick else ACCURACY)
        if args.part:
            cases = part_of(cases, *args.part)
        for method, L, K in cases:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                try:
                    payload["accuracy"].append(accuracy_case(method, L, K, dtype))
                except Exception:  # noqa: BLE001
                    payload["accuracy"].append(
                        {"method": method, "L": L, "K": K, "error": traceback.format_exc()[-600:]}
                    )
                log(payload["accuracy"][-1])
    payload["resources"] = kernel_resources()
    variants = {L: VARIANTS.get(L, []) for L in args.lengths}
    payload["speed"] = []
    speed(variants, payload["ceilings"]["copy_GBps"], payload["speed"], log)
    payload["resources"] = kernel_resources()
    save()

    table = Table(title="median ms, B=16 H=768 bf16 K=L (fraction of copy bandwidth, fwd)")
    for col in ("L", "variant", "pass", "ms", "bw frac"):
        table.add_column(col, justify="right")
    for r in payload["speed"]:
        table.add_row(
            str(r["L"]),
            escape(r["variant"]),  # "triton[default]" is not rich markup
            r.get("pass", "-"),
            f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")[:40],
            f"{r['bandwidth_frac']:.3f}" if "bandwidth_frac" in r else "",
        )
    console.print(table)
    table = Table(title="accuracy: ||got - ref|| / ||ref|| (float64 reference)")
    for col in ("method", "L", "K", "dtype", "y", "du", "dk", "dD", "dpre", "dpost"):
        table.add_column(col, justify="right")
    for r in payload["accuracy"]:
        errs = [
            f"{r[n]:.1e}" if n in r else "ERR" for n in ("y", "du", "dk", "dD", "dpre", "dpost")
        ]
        table.add_row(r["method"], str(r["L"]), str(r["K"]), r.get("dtype", "-"), *errs)
    console.print(table)
    for r in payload["resources"]:
        console.print(r)


if __name__ == "__main__":
    main()
