"""The `sandbox` command line. Bad input exits 2 with one line naming what is wrong."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sandbox.config import ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"sandbox: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_train(args) -> int:
    from sandbox.train import train

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(config, out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    print(f"run written to {out}")
    return 0


def _cmd_compare(args) -> int:
    from sandbox.compare import compare, load_preset

    preset = load_preset(args.preset)
    out = Path(args.out) if args.out else Path("runs") / "compare" / Path(args.preset).stem
    try:
        compare(preset, out, args.workers, args.seeds, args.overrides, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"sandbox: interrupted; rerun the same command to continue in {out}", file=sys.stderr)
        return 130
    print(f"results written to {out} (results.csv, table.md, gaps.png)")
    return 0


def _cmd_sweep(args) -> int:
    from optuna.trial import TrialState

    from sweeps.runner import SweepError, run_sweep

    try:
        study, out = run_sweep(
            args.space,
            n_trials=args.trials,
            storage=args.storage,
            study_name=args.study,
            jobs=args.jobs,
            out=args.out,
            worker=args.worker_index,
            heartbeat_s=args.heartbeat,
            report=not args.no_report,
        )
    except SweepError as e:
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sandbox: interrupted; rerun the same command to continue the study", file=sys.stderr)
        return 130
    if args.no_report:  # also how --jobs starts its workers: the parent sums up
        return 0
    if study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
        best = study.best_trial
        print(
            f"study {study.study_name!r}: best trial {best.number}, val_accuracy {best.value:.4f}"
        )
    print(f"report in {out} (trials.csv, best_config.yaml, *.png)")
    return 0


def _cmd_sweep_report(args) -> int:
    from sweeps.report import load_sweep_study, write_report

    study = load_sweep_study(args.out, args.storage, args.study)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / study.study_name
    for path in write_report(study, out):
        print(path)
    return 0


def _cmd_prepare_data(args) -> int:
    from sandbox.data.prepare import prepare_data

    try:
        index = prepare_data(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            val_files=args.val_files or (),
            workers=args.workers,
            seed=args.seed,
            chunk_docs=args.chunk_docs,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"sandbox: interrupted; rerun the same command to continue in {args.out}",
            file=sys.stderr,
        )
        return 130
    counts = ", ".join(
        f"{s}: {v['tokens']:,} tokens in {v['documents']:,} documents"
        for s, v in index["splits"].items()
    )
    print(f"{counts}; {index['malformed']['count']} malformed lines; written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one model on one synthetic task")
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.lr=1e-3")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="train a grid of mixers on tasks; print the gap table")
    p.add_argument("--preset", default="h3-table2", help="name in configs/compare/ or a YAML path")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides applied to every run")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds (default: the preset's)")
    p.add_argument("--out", help="output directory (default runs/compare/<preset>)")
    p.add_argument("--workers", type=_positive_int, help="parallel runs (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="Optuna sweep over a YAML search space (see sweeps/)")
    p.add_argument("space", nargs="?", help="search space YAML; leave out to join --study")
    p.add_argument(
        "--trials", type=int, help="finished trials the study ends with (default: the space's)"
    )
    p.add_argument("--storage", help="SQLAlchemy URL (default sqlite:///OUT/study.db)")
    p.add_argument("--study", help="study name (default: the space file's name)")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--out", help="directory for trials/ and the report (default runs/sweeps/STUDY)")
    p.add_argument(
        "--worker-index",
        type=int,
        default=0,
        help="first worker's index, mixed into the sampler seed (default 0)",
    )
    p.add_argument(
        "--heartbeat",
        type=int,
        default=30,
        help="seconds between heartbeats; a trial is stale after 3",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("sweep-report", help="trials.csv, best_config.yaml and figures of a sweep")
    p.add_argument("--out", help="sweep directory: its study.db, and where the report goes")
    p.add_argument("--storage", help="SQLAlchemy URL (default sqlite:///OUT/study.db)")
    p.add_argument("--study", help="study name (default: the only study in the storage)")
    p.set_defaults(func=_cmd_sweep_report)

    p = sub.add_parser(
        "prepare-data",
        help="tokenize Pile-format JSON lines (.jsonl, .jsonl.zst) into uint16 token files",
        description="Tokenize JSON-lines shards with a 'text' field into OUT/train.bin and "
        "OUT/val.bin (uint16, EOS after each document) and OUT/index.json. Rerun the same "
        "command to resume after a kill.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl or .jsonl.zst shards")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default="gpt2", help="default gpt2")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction",
        type=float,
        help="fraction of documents for val, chosen by a hash of the text (default 0.01)",
    )
    split.add_argument(
        "--val-files", nargs="+", metavar="FILE", help="files whose documents are the val split"
    )
    p.add_argument("--workers", type=_positive_int, help="tokenizer processes (default: CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val hash (default 0)")
    p.add_argument(
        "--chunk-docs", type=_positive_int, default=1024, help="lines per work unit (default 1024)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        # ValueError covers the validation of task and mixer parameters and run directories.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sandbox: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sandbox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
