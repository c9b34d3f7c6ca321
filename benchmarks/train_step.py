"""One training step of every run of a compare preset: what `sandbox compare` pays per step.

    python3 -m benchmarks.train_step [--preset h3-table2] [--repeats 41] [--threads 1]

For each (task, mixer) of the preset (seed 0, its first learning rate) the model, optimizer
and loss are built as `sandbox train` builds them, and one step (sandbox.train.training_step:
forward, loss, backward, gradient clipping, AdamW) on a fixed batch of the preset's batch
size is timed in three versions side by side, each undoing one of our changes: "ours";
"torch GELU", the MLPs' activation back on torch's F.gelu(approximate="tanh")
(kernels.gelu_tanh computes it through a sigmoid on CPU); and "foreach AdamW", torch's foreach
optimizer instead of the fused one. Each version trains its own copy of the model from the
same initial weights. Medians of ``--repeats`` rounds, the versions in a shuffled order each
round (benchmarks.fftconv.time_round_robin); "ours vs X" is the median over rounds of X's
time / ours, each ratio within one round (exactly so for an odd number of rounds).
JSON to benchmarks/results/train_step_{preset}_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import sandbox.model as model_module
import tasks
from benchmarks.fftconv import RESULTS, run_options, time_round_robin, write_results
from sandbox.compare import expand, load_preset
from sandbox.train import build_model, build_task, make_optimizer, training_step

BASELINES = ("torch GELU", "foreach AdamW")


def _torch_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _step_fn(config, model, batch, activation=None, fused=True):
    """A callable that runs one training step of ``model`` and returns its loss, with the
    MLPs' activation replaced by ``activation`` during the call when one is given."""
    optimizer = make_optimizer(model, config.train, fused=fused)

    def step():
        saved = model_module.gelu_tanh
        if activation is not None:
            model_module.gelu_tanh = activation
        try:
            loss = training_step(model, optimizer, batch, config.train)
        finally:
            model_module.gelu_tanh = saved
        return loss.detach()

    step.optimizer = optimizer  # for the tests
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="h3-table2")
    run_options(p, repeats=41)
    args = p.parse_args(argv)
    try:
        runs = expand(load_preset(args.preset), seeds=1)
    except (ValueError, OSError) as e:
        p.error(str(e))  # exit 2, one line
    torch.set_num_threads(args.threads)

    start, rows, seen = time.perf_counter(), [], set()
    for run in runs:
        config = run.config
        if (run.task, run.variant) in seen:  # other learning rates of the same run
            continue
        seen.add((run.task, run.variant))
        torch.manual_seed(config.seed)
        task = build_task(config)
        size = config.train.batch_size
        batch = tasks.make_splits(task, size, 1, 1, seed=config.seed).train
        model = build_model(config, task)
        fns = {
            "ours": _step_fn(config, model, batch),
            BASELINES[0]: _step_fn(config, copy.deepcopy(model), batch, _torch_gelu),
            BASELINES[1]: _step_fn(config, copy.deepcopy(model), batch, fused=False),
        }
        timing = time_round_robin(fns, False, args.repeats, "cpu", baseline="ours")
        for name in BASELINES:  # its time / ours, from ours' time / its time within rounds
            timing[name]["ours_speedup"] = 1 / timing[name].pop("speedup")
        del timing["ours"]["speedup"]
        rows.append({"task": run.task, "variant": run.variant, **timing})

    table = Table(title=f"training step, median ms ({args.preset}, {args.threads} thread)")
    for col in ("task", "variant", "ours", *BASELINES, *(f"ours vs {b}" for b in BASELINES)):
        table.add_column(col, justify="right")
    for r in rows:
        times = [f"{r[name]['median_ms']:.2f}" for name in ("ours", *BASELINES)]
        gains = [f"{r[name]['ours_speedup']:.2f}x" for name in BASELINES]
        table.add_row(r["task"], r["variant"], *times, *gains)
    Console().print(table)
    path = args.out or RESULTS / f"train_step_{args.preset}_cpu.json"
    write_results(path, "cpu", args.threads, start, rows, preset=args.preset, repeats=args.repeats)


if __name__ == "__main__":
    main()
