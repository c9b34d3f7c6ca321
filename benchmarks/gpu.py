"""Every GPU figure the project reports, in one command.

    python3 -m benchmarks.gpu [--out-dir benchmarks/results] [--only triton fftconv ...]

Runs, one after another, each in its own process (a step that fails is reported and the
others still run), writing JSON and a log per step into ``--out-dir``:
- triton:     benchmarks.triton_gpu - the Triton kernels' accuracy against float64, compiled
              resources, tuning variants, fused vs blocked past the dispatch threshold, and
              speed against the torch path and SDPA with the fraction of copy bandwidth;
- fftconv:    benchmarks.fftconv --device cuda - ours vs torch path vs naive vs SDPA, K = L;
- layers:     benchmarks.layer_speed at width 768, batch 8, L up to 16K (H3 vs attention);
- generation: benchmarks.generation at the paper's 1.3B shapes (GPT-2 vocabulary, batch 64,
              prompts of 512 / 1024 / 1536), hybrid H3 vs Transformer.
On an H100 (2026-11-23, runs cut by 10-minute calls): fftconv took 100 s, layers about a
minute, triton's accuracy part more than 150 s (compiling each size's kernels) and its speed
part 20-35 s per length, and generation more than 100 s, in which it built its three 1.3B
models and timed only the first prompt length. ``--only`` runs some steps, e.g. to fit a
time limit per command. Exit status 1 if any step failed, 2 for bad arguments or no GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.fftconv import RESULTS

# name: (module, arguments, JSON file name)
STEPS = {
    "triton": ("benchmarks.triton_gpu", [], "triton_gpu.json"),
    "fftconv": ("benchmarks.fftconv", ["--device", "cuda"], "fftconv_cuda.json"),
    "layers": (
        "benchmarks.layer_speed",
        ["--device", "cuda", "--width", "768", "--batch", "8", "--max-len", "16384"],
        "layer_speed_cuda.json",
    ),
    "generation": (
        "benchmarks.generation",
        ["--device", "cuda", "--size", "1.3b", "--vocab", "50264", "--batch", "64"]
        + ["--prompts", "512", "1024", "1536"],
        "generation-cuda.json",
    ),
}


def run_step(name: str, out_dir: Path) -> tuple[int, float]:
    """Runs one step, its output shown and also written to out_dir/NAME.log; returns (exit
    status, seconds)."""
    module, extra, json_name = STEPS[name]
    out_dir = out_dir.resolve()  # the step runs in the repository root, this may not
    cmd = [sys.executable, "-m", module, *extra, "--out", str(out_dir / json_name)]
    start = time.perf_counter()
    with open(out_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            cwd=Path(__file__).parents[1],
        )  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        status = proc.wait()
    return status, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device is available: these are the GPU benchmarks")  # exit 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only:
        print(f"== {name}", flush=True)
        results[name] = run_step(name, args.out_dir)
    print("== summary")
    for name, (status, seconds) in results.items():
        verdict = "ok" if status == 0 else f"FAILED (exit {status}, see {name}.log)"
        print(f"{name:>10}: {verdict}, {seconds:.0f} s")
    return 0 if all(status == 0 for status, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
