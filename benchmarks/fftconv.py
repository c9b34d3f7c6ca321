"""fftconv speed side by side: ours vs the naive torch FFT convolution vs causal SDPA.

    python3 -m benchmarks.fftconv [--threads 1] [--repeats 5] [--quick]   # CPU, ~5 minutes
    python3 -m benchmarks.fftconv --device cuda                            # GPU figures

Every case is timed after one warm-up call, the implementations being compared in turn
within each repeat (a shared machine's slow spells then hit all alike); the table shows
medians of ``--repeats`` runs, or of more in the side-by-side table where a round of calls is
short (``--min-seconds``; the JSON keeps the count and the minimum). The thread count is fixed
(default 1: on a shared 2-core machine a second thread mostly measures the neighbours).

- "ours": kernels.fftconv(u, k, D, pregate, postgate), method chosen by shape.
- "naive": rfft/irfft at n = 2L of u * pregate and of k, recomputed on every call, plus D and
  the postgate, differentiated by autograd.
- "sdpa": causal scaled_dot_product_attention over the same B, H, L, as H / 64 heads of 64.
Cases: K = L filters (the SSM case) at L = 256 .. 16K with B, H small enough for a CPU
(B = 1, H = 128 on CPU; B = 16, H = 768 in bf16 on CUDA); the tiny training shapes of the
synthetic tasks (B = 32, H = 64 and 256, L = 20 and 30); on CPU, the crossover sweeps that set
the thresholds in kernels/dispatch.py (each torch method forced); on CUDA, short filters (K = 64,
H3's shift SSM, and K = 256, the Toeplitz threshold) by each triton method and by torch.

Peak memory (CPU): the growth of the peak resident set size of a fresh subprocess over one
forward + backward, after its inputs are allocated (VmHWM - VmRSS from /proc/self/status, the
high-water mark reset to the current size first; the allocator returns large blocks to the OS,
so this tracks the peak of live tensors); the median of PEAK_SAMPLES subprocesses, the samples
kept in the JSON (one sample of naive at L = 256 ranged 3.4-5.3 MB from process to process).
On CUDA: max_memory_allocated.
JSON (machine info + all rows) goes to benchmarks/results/fftconv_{cpu,cuda}.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kernels import fft_torch, fftconv
from kernels.dispatch import METHODS
from sandbox.config import MAX_THREADS
from sandbox.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
PEAK_SAMPLES = 3


def naive_fftconv(u, k, D, pregate, postgate):
    """The textbook version: everything recomputed per call at n = 2L, autograd through it."""
    L = u.shape[-1]
    v = (u * pregate).float()  # torch.fft has no bf16, and fp16 only at powers of two
    z = torch.fft.irfft(torch.fft.rfft(v, n=2 * L) * torch.fft.rfft(k.float(), n=2 * L), n=2 * L)
    return ((z[..., :L] + D[:, None] * v) * postgate).to(u.dtype)


def sdpa(q, k, v):
    """Causal attention over [B, heads, L, 64] tensors (the layout a projection gives: each
    head's 64 features contiguous, which the flash kernels require)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_case(impl: str, B: int, H: int, L: int, K: int, dtype, device, **options):
    """A zero-argument callable running one forward of ``impl``, its inputs requiring grad.

    ``options`` (backend, method) go to kernels.fftconv for impl "ours".
    """
    # Drawn on the device: on CUDA's largest cases (B=16, H=768, L=16K: 200M samples per
    # tensor) one CPU thread drawing them took longer than timing them.
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, scale=1.0):
        x = scale * torch.randn(*shape, generator=g, device=device)
        return x.to(dtype).requires_grad_()

    if impl == "sdpa":  # H channels as H / 64 heads of 64
        q, k, v = (r(B, H // 64, L, 64) for _ in range(3))
        return lambda: sdpa(q, k, v)
    u, pre, post = r(B, H, L), r(B, H, L), r(B, H, L)
    filt, D = r(H, K, scale=0.1), r(H)
    if impl == "ours":
        return lambda: fftconv(u, filt, D, pre, post, **options)
    if impl == "naive":
        return lambda: naive_fftconv(u, filt, D, pre, post)
    raise ValueError(impl)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(
    fns: dict,
    backward: bool,
    repeats: int,
    device: str,
    min_seconds: float = 0.0,
    baseline: str | None = None,
) -> dict[str, dict]:
    """Median and min ms of each callable, timed in turn repeat by repeat, so that a slow spell
    of a shared machine hits all of them alike (one warm-up call each first). The order is
    shuffled each repeat (seeded): a call pays for what the one before it left behind (a cold
    cache, heap returned to the OS by a big free), so each callable must follow each of the
    others about as often. Rotating one order does not do that: it changes only which call
    opens a round, so each callable follows the same one in every other place. That put ours
    after SDPA and naive after ours in 2 of 3 calls at B=1, H=128, L=256, where a call after
    SDPA's runs cold: ours' forward measured 0.96-0.98x of naive rotated, against 0.99-1.01x
    when the two alternate alone (three runs each; README, Performance).

    ``min_seconds``: take more than ``repeats`` rounds where one round (the warm-up calls
    together) is short, so that the timed rounds fill about that long. A 0.3 ms call's median
    of 9 moved by 10-40% from run to run on this shared machine; one of ~1000 is steadier.

    ``baseline``: also give each callable's "speedup" over that one, the median over rounds of
    baseline time / its time, each ratio taken between calls of the same round. A slow spell
    that spans a round cancels out of its ratio; in a ratio of medians it does not, since the
    two medians may come from different rounds.
    """

    def once(fn):
        _sync(device)
        start = time.perf_counter()
        y = fn()
        if backward:
            y.float().sum().backward()
        _sync(device)
        return time.perf_counter() - start

    # The first call pays for allocation, FFT plans and dispatch caches; the second estimates
    # a round.
    for fn in fns.values():
        once(fn)
    round_s = sum(once(fn) for fn in fns.values())
    repeats = max(repeats, math.ceil(min_seconds / max(round_s, 1e-9)))
    seconds = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            seconds[name].append(once(fns[name]))
    out = {
        name: {"median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s), "repeats": repeats}
        for name, s in seconds.items()
    }
    if baseline is not None:
        for name, s in seconds.items():
            ratios = (b / t for b, t in zip(seconds[baseline], s, strict=True))
            out[name]["speedup"] = statistics.median(ratios)
    return out


def time_fwd_and_bwd(
    fns: dict, repeats: int, device: str, min_seconds: float = 0.0, baseline: str | None = None
) -> dict[str, tuple[dict, dict]]:
    """{name: (forward times, forward + backward times)}, each pass timed round robin."""
    forward_only = {n: (lambda fn=f: fn().detach()) for n, f in fns.items()}
    fwd = time_round_robin(forward_only, False, repeats, device, min_seconds, baseline)
    fwd_bwd = time_round_robin(fns, True, repeats, device, min_seconds, baseline)
    return {n: (fwd[n], fwd_bwd[n]) for n in fns}


def time_case(fn, backward: bool, repeats: int, device: str) -> dict:
    return time_round_robin({"case": fn}, backward, repeats, device)["case"]


def peak_memory_mb(impl: str, B: int, H: int, L: int, threads: int) -> list[float]:
    """Peak RSS growth (MB, 10^6 bytes) of PEAK_SAMPLES fresh processes, each over one forward
    + backward after a warm-up call (see module doc), sorted."""
    cmd = [sys.executable, "-m", "benchmarks.fftconv", "--peak-child", impl, str(B), str(H)]
    cmd += [str(L), "--threads", str(threads)]
    samples = []
    for _ in range(PEAK_SAMPLES):
        out = subprocess.run(
            cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parents[1]
        )
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return sorted(samples)


def _peak_child(impl: str, B: int, H: int, L: int) -> None:
    # A first call pages in library code (MKL's FFT codelets, oneDNN, ...): 5-8 MB of
    # file-backed pages at L = 256, most of what this used to report there. A warm-up of one
    # channel at the same L loads them (same FFT sizes) with buffers too small to move glibc's
    # mmap threshold, so the measured call's memory is still fresh pages.
    # One channel, or one head of 64 for SDPA (1 // 64 heads would load nothing).
    make_case(impl, 1, 64 if impl == "sdpa" else 1, L, L, torch.float32, "cpu")().sum().backward()
    fn = make_case(impl, B, H, L, L, torch.float32, "cpu")
    try:  # VmHWM := VmRSS, so that no earlier peak (imports, the warm-up) can count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _proc_status_kb("VmRSS")
    fn().sum().backward()
    print((_proc_status_kb("VmHWM") - before) * 1024 / 1e6)  # /proc's kB are KiB


def cuda_peak_mb(impl: str, B: int, H: int, L: int, dtype, **options) -> float:
    """CUDA's counterpart of peak_memory_mb: the growth of the allocated peak (MB) over one
    forward + backward of a fresh case, over what was allocated once its inputs were made.
    Neither the other cases' tensors (still alive) nor the inputs count; the gradients do, as
    in the CPU figure. FFT plans and compiled kernels are warm from the timing."""
    fn = make_case(impl, B, H, L, L, dtype, "cuda", **options)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn().float().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def _proc_status_kb(field: str) -> int:
    # VmHWM is this process's own high-water mark. Not ru_maxrss: Linux carries that across
    # fork + exec, so a child would report at least its parent's size.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def progress(row: dict) -> None:
    """One line per measured row, so that a run cut short still shows what it measured."""
    times = " ".join(f"{p} {row[p]['median_ms']:.3f}" for p in ("fwd", "fwd_bwd") if p in row)
    print(f"{row['case']} {row['impl']} L={row['L']} K={row['K']}: {times} ms", flush=True)


def run_side_by_side(args, device: str, dtype) -> list[dict]:
    B, H = (1, 128) if device == "cpu" else (16, 768)
    lengths = args.lengths or ([256, 1024, 4096] if args.quick else LENGTHS)
    # On CUDA "ours" picks its backend by shape; "ours[triton]" and "ours[torch]" force one.
    impls = [("ours", {}), ("naive", {}), ("sdpa", {})]
    if device == "cuda":
        impls[1:1] = [(f"ours[{b}]", {"backend": b}) for b in ("triton", "torch")]
    rows = []
    for L in lengths:
        fns = {
            name: make_case(name.split("[")[0], B, H, L, L, dtype, device, **options)
            for name, options in impls
        }
        # Attention is O(L^2): at L >= 8K on a CPU one call takes seconds, so it is timed on
        # its own with fewer repeats; the convolutions are timed in turn with each other.
        slow = {"sdpa"} if device == "cpu" and L >= 8192 else set()
        groups = [({n: f for n, f in fns.items() if n not in slow}, args.repeats)]
        groups += [({n: fns[n]}, 2) for n in slow]
        times = {}
        for group, repeats in groups:
            base = "naive" if "naive" in group else None
            times.update(time_fwd_and_bwd(group, repeats, device, args.min_seconds, base))
        for name, options in impls:
            row = {"case": "K=L", "impl": name, "B": B, "H": H, "L": L, "K": L}
            row["fwd"], row["fwd_bwd"] = times[name]
            if device == "cpu":
                row["peak_mb_samples"] = peak_memory_mb(name, B, H, L, args.threads)
                row["peak_mb"] = statistics.median(row["peak_mb_samples"])
            else:
                row["peak_mb"] = cuda_peak_mb(name.split("[")[0], B, H, L, dtype, **options)
                row["bandwidth_frac"] = bandwidth_fraction(B, H, L, dtype, row["fwd"]["median_ms"])
            rows.append(row)
            progress(row)
    return rows


def run_training_shapes(args, device: str, dtype) -> list[dict]:
    rows = []
    for H in (64, 256):
        for L in (20, 30):
            cases = {"ours": {}, "ours[fft]": {"method": "fft"}, "naive": {}}
            fns = {
                name: make_case(name.split("[")[0], 32, H, L, L, dtype, device, **options)
                for name, options in cases.items()
            }
            times = time_round_robin(
                fns, True, 4 * args.repeats, device, args.min_seconds, baseline="naive"
            )
            for name in fns:
                row = {"case": "training", "impl": name, "B": 32, "H": H, "L": L, "K": L}
                row["fwd_bwd"] = times[name]
                rows.append(row)
    return rows


def run_short_filters(args, dtype) -> list[dict]:
    """CUDA, K = 64 and 256: "ours" (the Toeplitz kernel) vs the fused FFT vs torch vs naive:
    the data for kernels.dispatch.TRITON_TOEPLITZ_MAX_TAPS."""
    impls = {"ours": {}, "ours[toeplitz]": {"backend": "triton", "method": "toeplitz"}}
    impls |= {"ours[fft]": {"backend": "triton", "method": "fft"}}
    impls |= {"ours[torch]": {"backend": "torch"}, "naive": {}}
    rows = []
    # 32K: past the fused FFT size, where "ours[fft]" is the blocked decomposition.
    for L in [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]:
        for K in (64, 256):
            fns = {
                n: make_case(n.split("[")[0], 16, 768, L, K, dtype, "cuda", **o)
                for n, o in impls.items()
            }
            for n, (fwd, fwd_bwd) in time_fwd_and_bwd(fns, args.repeats, "cuda").items():
                row = {"case": "short K", "impl": n, "B": 16, "H": 768, "L": L, "K": K}
                rows.append(row | {"fwd": fwd, "fwd_bwd": fwd_bwd})
                progress(rows[-1])
    return rows


def run_crossovers(args) -> list[dict]:
    """Each torch method forced, fwd + bwd: the data behind kernels/dispatch.py's thresholds
    (medians, the minima kept as "<method> min")."""
    grid = [(B, 64, L, L) for B in (4, 32) for L in (16, 24, 32, 48, 64, 96)]
    grid += [(B, 64, L, L) for B in (16, 64) for L in (32, 48, 64, 96, 128)]
    grid += [(B, 256, 32, 32) for B in (1, 4, 8, 32)]
    for L in (1024, 4096) if args.quick else (1024, 4096, 16384):
        grid += [(4, 64, L, K) for K in (3, 4, 8, 16, 64, 128, 256, 512)]
    rows = []
    for B, H, L, K in grid:
        row = {"case": "crossover", "B": B, "H": H, "L": L, "K": K}
        fns = {m: make_case("ours", B, H, L, K, torch.float32, "cpu", method=m) for m in METHODS}
        times = time_round_robin(fns, True, args.repeats, "cpu", args.min_seconds)
        row.update({m: times[m]["median_ms"] for m in METHODS})
        row.update({f"{m} min": times[m]["min_ms"] for m in METHODS})
        row["fastest"] = min(METHODS, key=lambda m: row[m])
        rows.append(row)
    return rows


def run_block_sweep(args) -> list[dict]:
    """The fft method's row-block size (kernels.fft_torch.BLOCK_ELEMS), fwd + bwd, K = L,
    median ms (the kept FFT buffer follows it: one block, one kept buffer)."""
    default, rows = fft_torch.BLOCK_ELEMS, []
    for L in (1024, 4096) if args.quick else (1024, 4096, 16384):
        row = {"case": "block", "B": 4, "H": 64, "L": L, "K": L}
        fn = make_case("ours", 4, 64, L, L, torch.float32, "cpu", method="fft")

        def with_block(log2, fn=fn):
            def run():
                fft_torch.BLOCK_ELEMS = 2**log2
                return fn()

            return run

        fns = {f"2^{log2}": with_block(log2) for log2 in (15, 17, 19, 21, 40)}
        times = time_round_robin(fns, True, args.repeats, "cpu", args.min_seconds)
        fft_torch.BLOCK_ELEMS = default
        row.update({name: t["median_ms"] for name, t in times.items()})
        rows.append(row)
    return rows


def bandwidth_fraction(B, H, L, dtype, fwd_ms) -> float:
    """Forward bytes (u, both gates read, y written) / time, over a measured device copy.

    The copy is repeated within one timed call until it moves about 1 GB: one copy of the
    short lengths' 25 MB takes ~10 us on an H100, less than the host clock and the two
    synchronisations around it, which would understate the copy bandwidth several times."""
    x = torch.empty(B * H * L * 4, dtype=dtype, device="cuda")
    y = torch.empty_like(x)
    copies = max(1, math.ceil(2**30 / (2 * x.nbytes)))

    def copy():
        for _ in range(copies):
            y.copy_(x)

    t = time_case(copy, False, 20, "cuda")["median_ms"] / copies
    copy_bw = 2 * x.nbytes / t
    return (4 * B * H * L * x.element_size() / fwd_ms) / copy_bw


def _speedup(row: dict, naive_row: dict, phase: str) -> float:
    """Naive time / row's time for ``phase`` ("fwd" or "fwd_bwd"): the median of paired ratios
    where the two were timed in the same rounds (time_round_robin's "speedup"), else the ratio
    of their medians (attention at long L, timed on its own)."""
    if "speedup" in row[phase]:
        return row[phase]["speedup"]
    return naive_row[phase]["median_ms"] / row[phase]["median_ms"]


def print_tables(rows: list[dict], console: Console) -> None:
    table = Table(title="fftconv vs naive FFT conv vs causal SDPA (median ms; peak MB)")
    cols = ("B", "H", "L", "K", "impl", "fwd ms", "fwd+bwd ms", "peak MB", "vs naive fwd, fwd+bwd")
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    naive = {(r["case"], r["H"], r["L"], r["K"]): r for r in rows if r.get("impl") == "naive"}
    for r in (r for r in rows if r["case"] in ("K=L", "training", "short K")):
        base = naive[(r["case"], r["H"], r["L"], r["K"])]
        speedups = [_speedup(r, base, p) for p in ("fwd", "fwd_bwd") if p in r]
        fwd = f"{r['fwd']['median_ms']:.2f}" if "fwd" in r else "-"
        peak = f"{r['peak_mb']:.1f}" if "peak_mb" in r else "-"
        table.add_row(
            *map(str, (r["B"], r["H"], r["L"], r["K"])),
            escape(r["impl"]),  # "ours[fft]" is not rich markup
            fwd,
            f"{r['fwd_bwd']['median_ms']:.2f}",
            peak,
            ", ".join(f"{x:.2f}x" for x in speedups),
        )
    console.print(table)
    cross = [r for r in rows if r["case"] == "crossover"]
    if cross:
        table = Table(title="torch methods forced, fwd+bwd median ms (crossovers)")
        for col in ("B", "H", "L", "K", *METHODS, "fastest"):
            table.add_column(col, justify="right")
        for r in cross:
            table.add_row(
                *(
                    str(r[c]) if isinstance(r[c], (int, str)) else f"{r[c]:.2f}"
                    for c in ("B", "H", "L", "K", *METHODS, "fastest")
                )
            )
        console.print(table)
    blocks = [r for r in rows if r["case"] == "block"]
    if blocks:
        sizes = [c for c in blocks[0] if c.startswith("2^")]
        table = Table(title="fft method, fwd+bwd median ms by row-block size (samples)")
        for col in ("B", "H", "L", *sizes):
            table.add_column(col, justify="right")
        for r in blocks:
            table.add_row(str(r["B"]), str(r["H"]), str(r["L"]), *(f"{r[c]:.2f}" for c in sizes))
        console.print(table)


def positive_int(text: str) -> int:
    """argparse type of the benchmarks' counts and sizes (--repeats, --threads, lengths,
    widths, batches): an integer of at least 1, else argparse's one-line error (exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def thread_count(text: str) -> int:
    """argparse type of --threads: 1 .. MAX_THREADS, as a run config's ``threads`` (100000
    segfaulted the OpenMP runtime)."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type of --min-seconds: a number of seconds in [0, 3600] (an hour per pass is
    plenty; 1e308 overflowed the repeat count)."""
    value = float(text)
    if not 0 <= value <= 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number of seconds in [0, 3600], got {text}")
    return value


def json_path(text: str) -> Path:
    """argparse type of --out: a file path the JSON can be written to, checked before the
    run (a directory, or a parent that is a file or not writable, failed at the end with a
    traceback, every measurement lost)."""
    path = Path(text)
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise argparse.ArgumentTypeError(f"{text}: cannot write under {parent}")
    return path


def run_options(p: argparse.ArgumentParser, repeats: int, out: Path | None = None) -> None:
    """The options every benchmark script takes: --threads (a fixed torch thread count),
    --repeats (timed rounds, default ``repeats``) and --out (the JSON path; None: the
    script's own default under benchmarks/results/)."""
    p.add_argument("--threads", type=thread_count, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--repeats", type=positive_int, default=repeats, help=f"timed rounds (default {repeats})"
    )
    where = str(out) if out else "under benchmarks/results/"
    p.add_argument("--out", type=json_path, default=out, help=f"JSON path (default {where})")


def write_results(path: Path, device: str, threads: int, start: float, rows: list, **fields):
    """A benchmark's JSON at ``path``: the machine, ``fields``, the wall time since ``start``
    (a time.perf_counter() reading) and the rows."""
    payload = {"machine": machine_info(device, threads), **fields}
    write_json(payload | {"wall_s": time.perf_counter() - start, "rows": rows}, path)


def write_json(payload: dict, path: Path) -> None:
    """Every benchmark's JSON, written atomically (sandbox.io: temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor field.
    The dev machine's host can change between sessions (CPU timings moved by up to 3x from one
    to the next), so CPU figures say which one they ran on."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _commit() -> str | None:
    """The checkout's commit (git describe --always --dirty), so that a JSON says which code
    it measured; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info(device: str, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "commit": _commit(),
        "argv": sys.argv[1:],
    }
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run_options(p, repeats=5)
    p.add_argument(
        "--min-seconds",
        type=seconds,
        default=1.0,
        help="side-by-side table: more repeats where a round of calls is short, to fill about "
        "this long per pass (default 1.0)",
    )
    p.add_argument("--quick", action="store_true", help="fewer lengths (a smoke run)")
    p.add_argument(
        "--lengths", type=positive_int, nargs="+", help=f"K = L lengths (default {LENGTHS})"
    )
    p.add_argument("--peak-child", nargs=4, metavar=("IMPL", "B", "H", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")  # exit 2, one line
    torch.set_num_threads(args.threads)
    if args.peak_child:
        impl, *sizes = args.peak_child
        return _peak_child(impl, *map(int, sizes))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    start = time.perf_counter()
    rows = run_side_by_side(args, args.device, dtype) + run_training_shapes(
        args, args.device, dtype
    )
    if args.device == "cpu":
        rows += run_crossovers(args) + run_block_sweep(args)
    else:
        rows += run_short_filters(args, dtype)
    print_tables(rows, Console())
    path = args.out or RESULTS / f"fftconv_{args.device}.json"
    write_results(
        path, args.device, args.threads, start, rows, dtype=str(dtype), repeats=args.repeats
    )


if __name__ == "__main__":
    main()
