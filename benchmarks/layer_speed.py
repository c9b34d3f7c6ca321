"""H3 vs attention layer of the same width: forward + backward time against sequence length.

    python3 -m benchmarks.layer_speed [--threads 1] [--repeats 5] [--width 256] [--batch 1]
    python3 -m benchmarks.layer_speed --device cuda --width 768 --batch 8 --max-len 16384
    python3 -m benchmarks.layer_speed --task-shapes [--repeats 21]
    python3 -m benchmarks.layer_speed --h3-forms --width 64 [--repeats 41]

Both layers come from layers.build ("h3" with its defaults: shift SSM then diagonal SSM, head
dim 1; "attention" with heads of 64). Each length is timed after one warm-up, the two layers in
turn within each repeat; medians of ``--repeats``. H3 is O(L log L) (O(L) beyond
kernels.STATE_PASSING_LEN), attention O(L^2), so the ratio column shows where H3 overtakes.
On CUDA both run under bf16 autocast, as in pretraining (attention through SDPA's flash
kernel; H3's convolutions through fftconv's CUDA default: the 64-tap shift SSM on Triton's
Toeplitz kernel, the diagonal SSM's length-L filter on the fused Triton FFT while its FFT
size is at most kernels.dispatch.TRITON_FFT_MAX, i.e. L <= 512, and on cuFFT beyond).
JSON to benchmarks/results/layer_speed_{cpu,cuda}.json (or --out).

``--task-shapes`` times instead every mixer of the h3-table2 preset as that preset trains it
(width 64, batch 32, L = 20 and 30, H3 with heads of 8): what a `sandbox compare` step costs
per layer. JSON to benchmarks/results/layer_speed_tasks_{cpu,cuda}.json.

``--h3-forms`` times multi-head H3 (head_dim 8, width ``--width``, batch 32) in its convolution
and its regrouped form (layers.h3.REGROUPED_MAX_LEN) at L = 20 .. 256: the data behind that
limit. JSON to benchmarks/results/layer_speed_h3_forms_{cpu,cuda}.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import layers
import layers.h3 as h3_module
from benchmarks.fftconv import RESULTS, positive_int, run_options, time_round_robin, write_results

LENGTHS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# The h3-table2 preset's mixers and shapes (configs/compare/h3-table2.yaml).
TASK_MIXERS = {"s4d": {}, "gss": {}, "h3": {"head_dim": 8}, "attention": {}, "hyena": {}}
TASK_WIDTH, TASK_BATCH, TASK_LENGTHS = 64, 32, (20, 30)
# --h3-forms: multi-head H3 (head_dim 8) in each of its two parallel forms, forced through
# layers.h3.REGROUPED_MAX_LEN, at the task batch and lengths on both sides of that limit.
H3_FORMS = {"h3[convolution]": 0, "h3[regrouped]": 10**9}
H3_FORM_LENGTHS = (20, 30, 64, 128, 256)


def _h3_form(mixer, limit: int):
    """mixer(x) with multi-head H3's regrouping limit set to ``limit`` for the call."""

    def call(x):
        saved, h3_module.REGROUPED_MAX_LEN = h3_module.REGROUPED_MAX_LEN, limit
        try:
            return mixer(x)
        finally:
            h3_module.REGROUPED_MAX_LEN = saved

    return call


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    run_options(p, repeats=5)
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--max-len", type=positive_int, default=8192)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    mode = p.add_mutually_exclusive_group()  # each writes its own JSON
    mode.add_argument("--task-shapes", action="store_true", help="the h3-table2 preset's shapes")
    mode.add_argument(
        "--h3-forms",
        action="store_true",
        help="multi-head H3's convolution and regrouped forms side by side (width --width)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")  # exit 2, one line
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.task_shapes:
        names, width, batch, lengths = list(TASK_MIXERS), TASK_WIDTH, TASK_BATCH, TASK_LENGTHS
        params = TASK_MIXERS
        mixers = {n: layers.build(n, d_model=width, **params[n]) for n in names}
    elif args.h3_forms:
        if args.width % 8:
            p.error(f"--h3-forms: --width must be a multiple of H3's head_dim 8, got {args.width}")
        names, width, batch = list(H3_FORMS), args.width, TASK_BATCH
        lengths = [L for L in H3_FORM_LENGTHS if L <= args.max_len]
        params = dict.fromkeys(names, {"head_dim": 8})
        h3 = layers.build("h3", d_model=width, **params[names[0]]).to(args.device)
        mixers = {n: _h3_form(h3, limit) for n, limit in H3_FORMS.items()}
    else:
        names, width, batch = ["h3", "attention"], args.width, args.batch
        lengths = [L for L in LENGTHS if L <= args.max_len]
        params = dict.fromkeys(names, {})
        mixers = {n: layers.build(n, d_model=width) for n in names}
    if not lengths:
        p.error(f"--max-len {args.max_len} is below every length this mode times")
    if not args.h3_forms:
        mixers = {n: m.to(args.device) for n, m in mixers.items()}
    cuda, ratio = args.device == "cuda", not (args.task_shapes or args.h3_forms)

    def call(mixer, x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return mixer(x)

    start, rows = time.perf_counter(), []
    for L in lengths:
        x = torch.randn(batch, L, width, device=args.device, requires_grad=True)
        fns = {name: (lambda m=mixer, x=x: call(m, x)) for name, mixer in mixers.items()}
        base = "attention" if ratio else None  # h3's "speedup": attention / h3, paired by round
        row = {"L": L, **time_round_robin(fns, True, args.repeats, args.device, baseline=base)}
        if ratio:  # the median of the rounds' ratios (was a ratio of the two medians)
            row["attention_over_h3"] = row["h3"]["speedup"]
        rows.append(row)

    table = Table(title=f"fwd+bwd median ms, B={batch}, width {width}")
    for col in ["L", *names] + (["attention / h3"] if ratio else []):
        table.add_column(escape(col), justify="right")
    for r in rows:
        cells = [f"{r[n]['median_ms']:.2f}" for n in names]
        table.add_row(str(r["L"]), *cells, *([f"{r['attention_over_h3']:.2f}"] if ratio else []))
    Console().print(table)
    name = "layer_speed_tasks" if args.task_shapes else "layer_speed"
    name = "layer_speed_h3_forms" if args.h3_forms else name
    write_results(
        args.out or RESULTS / f"{name}_{args.device}.json",
        args.device,
        args.threads,
        start,
        rows,
        batch=batch,
        width=width,
        mixers=params,  # the parameters each mixer was built with (beside width)
        repeats=args.repeats,
    )


if __name__ == "__main__":
    main()
