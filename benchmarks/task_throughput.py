"""Generation throughput of the synthetic tasks, in tokens/s (tokens = N * seq_len).

Each case is timed ``--repeats`` times after one warm-up call (fresh seed per call) and the
median is reported, with a fixed thread count so numbers are comparable across runs.

    python3 -m benchmarks.task_throughput [--threads 1] [--repeats 7] [--out PATH]

Writes a table to stdout and JSON (machine info + per-case results) to
benchmarks/results/task_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tasks

# (task, vocab_size, seq_len, num_examples): the paper settings, then long sequences.
CASES = [
    ("associative_recall", 10, 20, 20000),
    ("induction_head", 20, 30, 20000),
    ("associative_recall", 10, 1024, 2000),
    ("induction_head", 20, 1024, 2000),
]
DEFAULT_OUT = Path(__file__).parent / "results" / "task_throughput.json"


def time_case(name: str, vocab_size: int, seq_len: int, num_examples: int, repeats: int) -> dict:
    task = tasks.build(name, vocab_size=vocab_size, seq_len=seq_len)
    task.generate(num_examples, seed=0)  # warm-up: first-call allocation and dispatch costs
    seconds = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        task.generate(num_examples, seed=seed)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "task": name,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "num_examples": num_examples,
        "tokens": num_examples * seq_len,
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "tokens_per_s": num_examples * seq_len / median,
    }


def print_table(results: list[dict], threads: int) -> None:
    headers = ["task", "vocab", "seq_len", "N", "median ms", "Mtokens/s"]
    rows = [
        [
            r["task"],
            str(r["vocab_size"]),
            str(r["seq_len"]),
            str(r["num_examples"]),
            f"{r['median_s'] * 1e3:.2f}",
            f"{r['tokens_per_s'] / 1e6:.1f}",
        ]
        for r in results
    ]
    title = f"task generation throughput ({threads} thread{'s' if threads > 1 else ''})"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional here: fall back to aligned plain text
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        print(title)
        for row in [headers, *rows]:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def write_json(payload: dict, path: Path) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")

    torch.set_num_threads(args.threads)
    results = [time_case(*case, repeats=args.repeats) for case in CASES]
    print_table(results, args.threads)
    payload = {
        "benchmark": "task_throughput",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "repeats": args.repeats,
        "results": results,
    }
    write_json(payload, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
