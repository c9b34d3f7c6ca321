"""Generation and training throughput: a hybrid H3 model vs a Transformer of the same size.

    python3 -m benchmarks.generation [--threads 1] [--repeats 3]       # CPU default, minutes
    python3 -m benchmarks.generation --device cuda --size 1.3b --vocab 50264 --batch 64 \
        --prompts 512 1024 1536 --train-batch 8                        # the paper's setting

Models (sandbox.model.LanguageModel, same d_model, n_layers, MLP, vocabulary):
- "hybrid": H3 layers as released (learn_shift_b, d_state 64, head_dim 1, no positional
  embedding) with attention at the given layers (the released sizes' layers; the CPU default
  has one attention layer in 12, the share of the 125M model and of the 1.3B's 2 in 24);
- "transformer": attention in every layer, learned positions;
- "h3": H3 in every layer, to show whether an H3 step's cost is flat in the prompt length.
Generation (sandbox.generate, greedy): ``--batch`` random prompts of each ``--prompts``
length, ``--new-tokens`` new tokens; prefill s (reading the prompt in one parallel pass),
decode ms per new token, decode tokens/s (new tokens of all sequences per decode second) and
end-to-end tokens/s (prefill included), medians of ``--repeats``, the models timed in turn
within each repeat so a shared machine's slow spells hit them alike (one warm-up first);
the hybrid / Transformer ratios are the medians of each repeat's ratio.
Training: tokens/s of one forward + backward + AdamW step at ``--train-seq-len``, and the
same ratio paired by round.

The CPU default is small (d_model 256, 12 layers with attention at 6, vocab 4096) so a run
takes minutes: the vocabulary projection is then about a tenth of a decode step's
multiply-adds, as in the paper's 1.3B model with GPT-2's vocabulary (8%); GPT-2's vocabulary
on this width would make every model mostly that projection. ``--size`` takes the released
models' shapes (125m, 355m, 1.3b, 2.7b) for a GPU; CUDA runs in float32.
JSON to benchmarks/results/generation-{cpu,cuda}.json (or --out), rewritten after each
prompt length, so that a run cut short (a time limit, running out of memory at a long prompt)
keeps the lengths it timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from benchmarks.fftconv import (
    RESULTS,
    machine_info,
    positive_int,
    run_options,
    time_round_robin,
    write_json,
)
from sandbox.config import ModelConfig
from sandbox.generate import generate
from sandbox.model import LanguageModel

# d_model, n_layers, attention heads, attention layers: the released H3 models (REFERENCE).
SIZES = {
    "small": (256, 12, 4, [6]),
    "125m": (768, 12, 12, [6]),
    "355m": (1024, 24, 16, [8, 16]),
    "1.3b": (2048, 24, 16, [8, 16]),
    "2.7b": (2560, 32, 20, [8, 16, 24]),
}
MODELS = ("hybrid", "transformer", "h3")


def build_models(args, max_len: int) -> dict[str, LanguageModel]:
    d, n_layers, heads, attn_layers = SIZES[args.size]
    h3 = {"learn_shift_b": True}
    configs = {
        "hybrid": ModelConfig(mixer="h3", mixer_params=h3, attn_layers=attn_layers, pos_emb=False,
                              attn_params={"num_heads": heads}, d_model=d, n_layers=n_layers),
        "transformer": ModelConfig(mixer="attention", mixer_params={"num_heads": heads},
                                   d_model=d, n_layers=n_layers),
        "h3": ModelConfig(mixer="h3", mixer_params=h3, d_model=d, n_layers=n_layers),
    }  # fmt: skip
    torch.manual_seed(0)
    return {
        name: LanguageModel(c, args.vocab, max_len).to(args.device).eval()
        for name, c in configs.items()
    }


def time_generation(models: dict, args, rows: list, save) -> None:
    """Appends a row per (prompt length, model) to ``rows``, calling save() after each length."""
    g = torch.Generator().manual_seed(0)
    for T in args.prompts:
        prompt = torch.randint(0, args.vocab, (args.batch, T), generator=g).to(args.device)
        # An untimed warm-up at each length (allocation, dispatch and FFT-plan caches): with
        # one at a short prompt only, each length's first timed repeat paid for its FFT sizes
        # and fresh memory, more in the H3 models' prefill than in attention's.
        for model in models.values():
            generate(model, prompt, max_new_tokens=min(2, args.new_tokens), temperature=0)
        runs = {name: [] for name in models}
        order, shuffle = list(models), random.Random(T).shuffle
        for _ in range(args.repeats):
            shuffle(order)  # as time_round_robin: no model always runs after the same one
            for name in order:
                runs[name].append(generate(models[name], prompt, args.new_tokens, temperature=0))
        for name, results in runs.items():
            row = {"prompt_len": T, "model": name}
            for field in ("prefill_s", "decode_s", "decode_ms_per_token", "tokens_per_s"):
                row[field] = statistics.median(getattr(r, field) for r in results)
            row["decode_tokens_per_s"] = args.batch * args.new_tokens / row["decode_s"]
            # Each repeat's figures, in repeat order, for the ratios paired by repeat.
            row["runs_decode_tokens_per_s"] = [
                args.batch * args.new_tokens / r.decode_s for r in results
            ]
            row["runs_tokens_per_s"] = [r.tokens_per_s for r in results]
            rows.append(row)
            print(f"  T={T} {name}: {row['decode_ms_per_token']:.2f} ms/token", flush=True)
        del runs  # each run's tokens; the next length's caches need the memory
        save()


def time_training(models: dict, args) -> dict[str, dict]:
    """Median ms of forward + backward + AdamW step on random tokens, tokens/s, and the
    speedup over the transformer (paired by round)."""
    g = torch.Generator().manual_seed(1)
    shape = (args.train_batch, args.train_seq_len + 1)
    tokens = torch.randint(0, args.vocab, shape, generator=g).to(args.device)

    def train_step(model, optimizer):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    fns = {}
    for name in ("hybrid", "transformer"):
        model = models[name].train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fns[name] = lambda m=model, o=optimizer: train_step(m, o)
    # "speedup": transformer time / this model's, paired by round.
    timings = time_round_robin(fns, False, args.repeats, args.device, baseline="transformer")
    for t in timings.values():
        t["tokens_per_s"] = args.train_batch * args.train_seq_len / (t["median_ms"] / 1e3)
    return timings


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over repeats of a[i] / b[i]: the two models of one repeat ran back to back,
    so a slow spell of a shared machine that hits both cancels (a ratio of the two medians
    can pair one model's fast repeat with the other's slow one)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def summarise(rows: list[dict]) -> list[dict]:
    """Per prompt length: hybrid / transformer tokens/s (decode and end to end, paired by
    repeat), and each model's decode ms per token over its own at the shortest prompt (1.0 =
    flat)."""
    by = {(r["prompt_len"], r["model"]): r for r in rows}
    lengths = sorted({r["prompt_len"] for r in rows})
    summary = []
    for T in lengths:
        hybrid, transformer = by[T, "hybrid"], by[T, "transformer"]
        entry = {"prompt_len": T}
        for ratio, field in (
            ("decode_ratio", "decode_tokens_per_s"),
            ("e2e_ratio", "tokens_per_s"),
        ):
            runs = f"runs_{field}"
            entry[ratio] = paired_ratio(hybrid[runs], transformer[runs])
        for m in MODELS:
            ms = by[T, m]["decode_ms_per_token"]
            entry[f"{m}_step_growth"] = ms / by[lengths[0], m]["decode_ms_per_token"]
        summary.append(entry)
    return summary


def print_tables(rows, summary, training, args, console: Console) -> None:
    table = Table(title=f"generation, batch {args.batch}, {args.new_tokens} new tokens (medians)")
    for col in ("prompt", "model", "prefill s", "decode ms/token", "decode tok/s", "e2e tok/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["prompt_len"]), r["model"], f"{r['prefill_s']:.2f}",
                      f"{r['decode_ms_per_token']:.2f}", f"{r['decode_tokens_per_s']:.0f}",
                      f"{r['tokens_per_s']:.0f}")  # fmt: skip
    console.print(table)

    table = Table(title="hybrid / transformer tokens/s, and decode time over the shortest prompt's")
    for col in ("prompt", "decode ratio", "e2e ratio", *(f"{m} step x" for m in MODELS)):
        table.add_column(col, justify="right")
    for r in summary:
        table.add_row(str(r["prompt_len"]), f"{r['decode_ratio']:.2f}", f"{r['e2e_ratio']:.2f}",
                      *(f"{r[f'{m}_step_growth']:.2f}" for m in MODELS))  # fmt: skip
    console.print(table)

    table = Table(title=f"training step (fwd + bwd + AdamW), {args.train_batch} x "
                        f"{args.train_seq_len} tokens")  # fmt: skip
    for col in ("model", "median ms", "tokens/s"):
        table.add_column(col, justify="right")
    for name, t in training.items():
        table.add_row(name, f"{t['median_ms']:.0f}", f"{t['tokens_per_s']:.0f}")
    table.add_row("hybrid / transformer (paired)", "", f"{training['hybrid']['speedup']:.2f}")
    console.print(table)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run_options(p, repeats=3)
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument(
        "--vocab", type=positive_int, default=4096, help="50264 for GPT-2's padded vocabulary"
    )
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--prompts", type=positive_int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--train-batch", type=positive_int, default=1)
    p.add_argument("--train-seq-len", type=positive_int, default=2048)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")  # exit 2, one line
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    max_len = max(max(args.prompts) + args.new_tokens, args.train_seq_len)
    models = build_models(args, max_len)
    params = {name: m.num_params() for name, m in models.items()}
    print(f"parameters: {params}", flush=True)
    rows = []
    payload = {
        "machine": machine_info(args.device, args.threads),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "architecture": dict(
            zip(("d_model", "n_layers", "heads", "attn_layers"), SIZES[args.size])
        ),
        "params": params,
        "generation": rows,
    }

    def save():
        payload["wall_s"] = time.perf_counter() - start
        write_json(payload, args.out or RESULTS / f"generation-{args.device}.json")

    with torch.no_grad():
        time_generation(models, args, rows, save)
    payload["summary"] = summarise(rows)
    payload["training"] = training = time_training(models, args)
    save()
    print_tables(rows, payload["summary"], training, args, Console())


if __name__ == "__main__":
    main()
