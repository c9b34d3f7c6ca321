"""Every GPU figure the project reports, in one command.

    python3 -m benchmarks.gpu [--out-dir benchmarks/results] [--only triton-speed fftconv ...]

Runs, one after another, each in its own process (a step that fails is reported and the
others still run), writing JSON and a log per step into ``--out-dir``:
- triton-speed, triton-speed-long: benchmarks.triton_gpu --skip-accuracy at L = 256 .. 1024
              and 2048 .. 8192 - the fused kernel's tuning variants (VARIANTS: plans with
              several batch rows per program), its one-launch and three-launch backward, the
              torch path and SDPA, the fraction of copy bandwidth;
- fftconv:    benchmarks.fftconv --device cuda - ours vs torch path vs naive vs SDPA, K = L;
- layers:     benchmarks.layer_speed at width 768, batch 8, L up to 16K (H3 vs attention);
- generation: benchmarks.generation at the paper's 1.3B shapes (GPT-2 vocabulary, batch 64,
              prompts of 512 / 1024 / 1536), hybrid H3 vs Transformer;
- triton-accuracy-1 .. 3: benchmarks.triton_gpu's accuracy cases (ACCURACY) in three parts,
              every Triton path against float64, fp32 / bf16 / fp16.
Each step is sized to finish within a 10-minute call (a lent GPU's limit). On an H100
(2026-11-23): fftconv took 100 s, layers about a minute, triton_gpu's accuracy part 14 of its
27 rows in one 10-minute call (compiling each size's kernels dominates) and its speed part
20-35 s per length before the rows-per-program variants, and generation more than 100 s
building its three 1.3B models and timing the first prompt length. ``--only`` runs some
steps; on a lent machine give each its own call and ``--out-dir "$OUT"`` (only files there
come back). Exit status 1 if any step failed, 2 for bad arguments or no GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.fftconv import RESULTS

# Not imported from benchmarks.triton_gpu: importing triton here, before a test sets
# TRITON_INTERPRET=1 for the interpreted kernel tests, would start its GPU runtime instead.
ACCURACY_PARTS = 3


def _accuracy_step(part: int) -> list[str]:
    """triton_gpu's arguments for part ``part`` of its accuracy cases and no speed part."""
    return ["--lengths", "--part", f"{part}/{ACCURACY_PARTS}"]


# name: (module, arguments, JSON file name), in the order a plain run takes them: the figures
# that set the kernels' plans first, the accuracy parts (the longest) last.
STEPS = {
    "triton-speed": (
        "benchmarks.triton_gpu",
        ["--skip-accuracy", "--lengths", "256", "512", "1024"],
        "triton_gpu_speed.json",
    ),
    "triton-speed-long": (
        "benchmarks.triton_gpu",
        ["--skip-accuracy", "--lengths", "2048", "4096", "8192"],
        "triton_gpu_speed_long.json",
    ),
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
    # About three cases (nine rows) each: one call did 14 rows of the sizes up to n = 8192.
    **{
        f"triton-accuracy-{i}": (
            "benchmarks.triton_gpu",
            _accuracy_step(i),
            f"triton_gpu_acc{i}.json",
        )
        for i in range(1, ACCURACY_PARTS + 1)
    },
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
