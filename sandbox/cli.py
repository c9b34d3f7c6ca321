"""The `sandbox` command line. Bad input exits 2 with one line naming what is wrong."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

from sandbox.config import ConfigError, load_config, preset_names
from sandbox.pools import WorkerDied


class _HelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text, width):
        # Wrapped at spaces only: a name such as h3-ih-paper-loss must stay whole.
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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


def _seed(text: str) -> int:
    """A seed, 0 .. 2^64 - 1 (what a torch.Generator takes; the configs' seed range)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^64 - 1], got {value}")
    return value


def _nonempty(value: str) -> str:
    """argparse type of --out, --storage and --study: an empty value (an unset "$OUT" in a
    script) was taken as the cwd by prepare-data and as "the default" by the others."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty value")
    return value


def _warn_if_nothing_to_resume(out: Path, config, resume: bool) -> None:
    """--resume without a checkpoint in --out starts from step 0 (job scripts pass --resume
    on every attempt, the first included), but says so: a mistyped --out would otherwise
    silently redo a whole run."""
    from sandbox.train import CHECKPOINT, check_run_dir

    if not resume or (out / CHECKPOINT).exists() or (out / "result.json").exists():
        return
    check_run_dir(out, config, resume)  # a refusal (a file, another config) comes alone
    print(
        f"sandbox: warning: --resume: nothing to resume in {out} (no {CHECKPOINT}); "
        "starting from step 0",
        file=sys.stderr,
    )


def _cmd_train(args) -> int:
    from sandbox.train import train

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    _warn_if_nothing_to_resume(out, config, args.resume)
    result = train(config, out, resume=args.resume, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    print(f"run written to {out}")
    if result.get("diverged_at"):  # older runs' result.json lack the key
        print(
            f"sandbox: error: the training loss was not finite at step {result['diverged_at']}: "
            "the run diverged and stopped there (lower train.lr)",
            file=sys.stderr,
        )
        return 1
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
    written = ", ".join(["results.csv", "table.md", *(f"{f}.png" for f in preset.figures)])
    print(f"results written to {out} ({written})")
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
    from sandbox.data.tiny_corpus import TINY_CORPUS

    inputs = [*args.inputs, *([str(TINY_CORPUS)] if args.tiny_corpus else [])]
    if not inputs:
        raise ValueError("prepare-data: give INPUT files or --tiny-corpus")
    try:
        index = prepare_data(
            inputs,
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


def _cmd_generate(args) -> int:
    import torch

    from sandbox.generate import generate, load_for_generation

    model, tokenizer = load_for_generation(args.checkpoint, args.config)
    try:
        ids = tokenizer.encode(args.prompt)
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 (surrogate-escaped)
        raise ValueError(
            f"--prompt is not valid UTF-8 text (characters {e.start}-{e.end - 1})"
        ) from None
    if not ids:
        raise ValueError("--prompt is empty")
    result = generate(
        model,
        torch.tensor([ids]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
        eos_id=tokenizer.eot_token,
        vocab_size=tokenizer.vocab_size,
    )
    print(tokenizer.decode(result.tokens[0].tolist()))
    print(
        f"{result.new_tokens} new tokens: prompt read in {result.prefill_s:.3f} s, "
        f"{result.decode_ms_per_token:.1f} ms per new token",
        file=sys.stderr,
    )
    return 0


def _cmd_pretrain(args) -> int:
    from sandbox.pretrain import pretrain
    from sandbox.pretrain_config import load_pretrain_config

    config = load_pretrain_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / "pretrain" / Path(args.config).stem
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process warns
        _warn_if_nothing_to_resume(out, config, args.resume)
    result = pretrain(config, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        print(json.dumps(result, indent=2))
        print(f"run written to {out}")
    return 0


def _cmd_params(args) -> int:
    import torch

    from sandbox.model import LanguageModel
    from sandbox.pretrain_config import PretrainConfig, load_any_config, vocab_size
    from sandbox.train import build_task

    config = load_any_config(args.config, args.overrides)
    if isinstance(config, PretrainConfig):
        vocab, seq_len = vocab_size(config.data), config.data.seq_len
    else:
        task = build_task(config)
        vocab, seq_len = task.vocab_size, task.seq_len
    with torch.device("meta"):  # shapes only: a 2.7B model costs no memory
        model = LanguageModel(config.model, vocab_size=vocab, max_seq_len=seq_len)
    total = model.num_params()
    print(f"{args.config}: {total:,} parameters (tied LM head counted once; vocab {vocab:,})")
    for part, n in sorted(model.param_counts().items(), key=lambda kv: -kv[1]):
        print(f"  {part:<18} {n:>15,}  {n / total:6.1%}")
    return 0


def _add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    # default=[]: argparse takes a nargs="*" positional without a default for a required one
    # and names it in "the following arguments are required" when CONFIG is missing.
    p.add_argument("overrides", nargs="*", default=[], help=help)


def _add_run_arguments(p: argparse.ArgumentParser, what: str, example: str, out: str) -> None:
    """The arguments `train` and `pretrain` share: CONFIG, overrides, --out, --resume, --quiet."""
    p.add_argument("config", help=f"{what} config YAML (see configs/)")
    _add_overrides(p, f"a.b=value overrides, e.g. {example}")
    p.add_argument("--out", type=_nonempty, help=f"run directory (default {out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one model on one synthetic task")
    _add_run_arguments(p, "run", "train.lr=1e-3", "runs/<config name>")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="train a grid of mixers on tasks; print the gap table")
    p.add_argument(
        "--preset",
        default="h3-table2",
        help=f"a name in configs/compare/ ({', '.join(preset_names())}) or a YAML path "
        "(default %(default)s)",
    )
    _add_overrides(p, "a.b=value overrides applied to every run")
    p.add_argument("--seeds", type=_positive_int, help="number of seeds (default: the preset's)")
    p.add_argument("--out", type=_nonempty, help="output directory (default runs/compare/<preset>)")
    p.add_argument("--workers", type=_positive_int, help="parallel runs (default: CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="Optuna sweep over a YAML search space (see sweeps/)")
    p.add_argument("space", nargs="?", help="search space YAML; leave out to join --study")
    p.add_argument(
        "--trials", type=int, help="finished trials the study ends with (default: the space's)"
    )
    p.add_argument(
        "--storage", type=_nonempty, help="SQLAlchemy URL (default sqlite:///OUT/study.db)"
    )
    p.add_argument("--study", type=_nonempty, help="study name (default: the space file's name)")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument(
        "--out",
        type=_nonempty,
        help="directory for trials/ and the report (default runs/sweeps/STUDY)",
    )
    p.add_argument(
        "--worker-index",
        type=int,
        default=0,
        help="first worker's index, mixed into the sampler seed (default 0)",
    )
    p.add_argument(
        "--heartbeat",
        type=int,
        default=None,
        help="seconds between heartbeats, for a new study (default 30); a trial is stale "
        "after 3; joining workers use the study's",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("sweep-report", help="trials.csv, best_config.yaml and figures of a sweep")
    p.add_argument(
        "--out", type=_nonempty, help="sweep directory: its study.db, and where the report goes"
    )
    p.add_argument(
        "--storage", type=_nonempty, help="SQLAlchemy URL (default sqlite:///OUT/study.db)"
    )
    p.add_argument(
        "--study", type=_nonempty, help="study name (default: the only study in the storage)"
    )
    p.set_defaults(func=_cmd_sweep_report)

    p = sub.add_parser(
        "prepare-data",
        help="tokenize Pile-format JSON lines (.jsonl, .jsonl.zst) into uint16 token files",
        description="Tokenize JSON-lines shards with a 'text' field into OUT/train.bin and "
        "OUT/val.bin (uint16, EOS after each document) and OUT/index.json. Rerun the same "
        "command to resume after a kill.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=".jsonl or .jsonl.zst shards")
    p.add_argument("--out", type=_nonempty, required=True, help="output directory")
    p.add_argument(
        "--tiny-corpus",
        action="store_true",
        help="add the small generated corpus shipped with the package (quick start, tests)",
    )
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
    p.add_argument("--seed", type=_seed, default=0, help="seed of the val hash (default 0)")
    p.add_argument(
        "--chunk-docs", type=_positive_int, default=1024, help="lines per work unit (default 1024)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_data)

    p = sub.add_parser(
        "pretrain",
        help="pretrain a language model on prepare-data output (one process or torchrun)",
        description="Pretrain a language model (see configs/pretrain/ and docs/pretraining.md). "
        "Under `torchrun --nproc_per_node N` each process trains on its slice of every batch.",
    )
    _add_run_arguments(p, "pretrain", "train.max_steps=100", "runs/pretrain/<config name>")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("params", help="parameter count of a run or pretrain config, by part")
    p.add_argument("config", help="run config or pretrain config YAML")
    _add_overrides(p, "a.b=value overrides, e.g. model.n_layers=24")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a pretrained model",
        description="Sample a continuation of --prompt: the prompt is read in parallel, then one "
        "recurrent step per new token. CHECKPOINT is a `sandbox pretrain` run directory or "
        "checkpoint file, or a released H3 checkpoint (.bin/.pt) together with --config.",
    )
    p.add_argument("checkpoint", help="run directory or checkpoint file")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, help="tokens to add (default 64)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 for greedy decoding (default 1.0)"
    )
    p.add_argument("--top-k", type=_positive_int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep probability mass p")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--config",
        help="the pretrain config of a released H3 checkpoint, e.g. configs/pretrain/h3-125m.yaml",
    )
    p.set_defaults(func=_cmd_generate)
    return parser


def _out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OutOfMemoryError, the CPU allocator's RuntimeError (torch raises no
    dedicated type for it) or Python's MemoryError; not any other RuntimeError, whose
    traceback is the only clue to a bug."""
    torch = sys.modules.get("torch")  # not imported: nothing of torch's can have failed
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments, with a.b=value overrides accepted after the flags too
    (`sandbox train c.yaml --out r train.lr=1e-2`): argparse takes a positional list only
    in one run of positionals, and its intermixed parsing does not work with subcommands."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra and (late != extra or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def _run(argv: list[str] | None) -> int:
    args = _parse(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        # ValueError covers the validation of task and mixer parameters and run directories.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sandbox: error: {msg}", file=sys.stderr)
        return 2
    except WorkerDied as e:  # not the input's fault: exit 1, and the line says what to do
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        size = re.search(r"tried to allocate ([\d.]+ ?\w+)", str(e), re.IGNORECASE)
        print(
            f"sandbox: error: out of memory in `sandbox {args.command}`"
            + (f" (tried to allocate {size[1]})" if size else "")
            + "; try smaller sizes (sequence length, batch size, model width or depth)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("sandbox: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # Flushed here, not at exit: a reader that is gone (`| head -1`) must raise where
            # it is handled below, not in the interpreter's final flush.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe: the rest of the output is not wanted. Point stdout at
        # devnull so that the interpreter's final flush does not raise again (Python docs,
        # "Note on SIGPIPE"), and exit as a process killed by SIGPIPE does (cat, yes): 141.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
