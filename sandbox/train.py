"""Training and evaluation of a LanguageModel on a synthetic task.

The loop is step-based and deterministic: the data order of epoch e is a permutation drawn
from a generator seeded by (seed, e), so a run resumed from a checkpoint at step s continues
with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from tqdm.auto import tqdm

import layers
import tasks
from sandbox.config import RunConfig, TrainConfig, dump_config, load_yaml
from sandbox.io import (
    atomic_write,
    atomic_write_text,
    load_checkpoint,
    load_model_weights,
    load_resume_checkpoint,
    lock_dir,
    make_dir,
    read_record,
    remove_stale_temps,
    save_checkpoint,
)
from sandbox.model import LanguageModel

if TYPE_CHECKING:
    from pydantic import BaseModel

    from sandbox.pretrain_config import PretrainTrainConfig

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"


class RunDirError(ValueError):
    """The output directory cannot take this run (exists, or holds a different config);
    ``differences`` names the fields that differ, for callers that phrase the refusal their
    own way."""

    def __init__(self, message: str, differences: str | None = None):
        super().__init__(message)
        self.differences = differences


# torch's thread count when the process started: what `threads: null` means, whatever runs
# came before in the same process (compare --workers 1, sweeps, notebooks).
_DEFAULT_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` torch threads (None: the process's default), then put
    back the count found: the thread count changes a CPU run's numbers, so one run must not
    leave its count to the next."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or _DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config field 'device': cuda requested but no CUDA device is available")
    return torch.device(name)


def build_task(config: RunConfig) -> tasks.Task:
    try:
        return tasks.build(config.task.name, **config.task.params)
    except ValueError as e:
        raise ValueError(f"task: {e}") from None


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The generator states a resume restores: the CPU's, and on a GPU the device's, which
    draws dropout's masks there."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def build_model(config: RunConfig, task: tasks.Task) -> LanguageModel:
    torch.manual_seed(config.seed)  # initialisation is part of what the seed fixes
    return LanguageModel(config.model, vocab_size=task.vocab_size, max_seq_len=task.seq_len)


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig | PretrainTrainConfig, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW with three groups: decayed weight matrices; biases, norms and embeddings without
    decay; SSM parameters (dt, A, B) at lr min(ssm_lr, lr) without decay (the S4/H3 recipe).
    ``fused=False`` takes torch's foreach implementation instead of the fused one."""
    # Embeddings are excluded from decay as in Safari's parameter grouping: the tied table is
    # also the output layer, and shrinking it shrinks every logit. Biases go by name too:
    # Hyena's skip terms are one [order, D] "bias", which is no weight matrix.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    flagged = {id(p) for p in layers.ssm_parameters(model)}
    ssm, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in flagged:
            ssm.append(p)
        elif p.dim() >= 2 and id(p) not in embeddings and not name.endswith("bias"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": ssm, "weight_decay": 0.0, "lr": min(cfg.ssm_lr, cfg.lr)},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    # fused: one kernel per parameter group instead of a dozen foreach ops over the tensors.
    # A whole training step of h3-table2's runs is 1.03-1.06x faster on CPU than with foreach
    # (benchmarks.train_step); parameters agree with foreach's to 1e-6 (relative) after 32
    # steps, the rounding of another order of operations.
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=cfg.betas, **impl)


def lr_factor(step: int, total: int, cfg: TrainConfig | PretrainTrainConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then decay."""
    # floor, with 1e-9 of slack: 0.29 * 100 is 28.999999999999996 in floating point.
    warmup = math.floor(cfg.warmup_frac * total + 1e-9)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * shape


def lm_loss(logits: torch.Tensor, batch: tasks.Batch, loss_on: str) -> torch.Tensor:
    """Cross entropy on every labelled next token ("all") or on answer positions only."""
    targets = batch.targets
    if loss_on == "answers":
        targets = targets.masked_fill(~batch.answer_mask, tasks.IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=tasks.IGNORE_INDEX)


def training_step(
    model: LanguageModel, optimizer: torch.optim.Optimizer, batch: tasks.Batch, cfg: TrainConfig
) -> torch.Tensor:
    """One optimizer step on ``batch`` (loss, backward, gradient clipping, AdamW); returns the
    loss, still attached to the graph."""
    loss = lm_loss(model(batch.inputs), batch, cfg.loss_on)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss


@torch.no_grad()
def evaluate(model: LanguageModel, batch: tasks.Batch, batch_size: int = 500) -> dict:
    """Answer-position metrics: micro accuracy, fraction of examples fully right, answer loss."""
    was_training = model.training
    model.eval()
    correct = total = exact = 0
    loss_sum = 0.0
    for start in range(0, len(batch), batch_size):
        part = batch[start : start + batch_size]
        logits = model(part.inputs)
        mask = part.answer_mask
        hit = (logits.argmax(-1) == part.targets) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        exact += int((hit.sum(1) == mask.sum(1)).sum())
        loss_sum += float(F.cross_entropy(logits[mask], part.targets[mask], reduction="sum"))
    model.train(was_training)
    return {"accuracy": correct / total, "exact": exact / len(batch), "loss": loss_sum / total}


def steps_per_epoch(config: RunConfig) -> int:
    return math.ceil(config.task.num_train / config.train.batch_size)


def total_steps(config: RunConfig) -> int:
    """Length of the run's schedule: epochs x steps per epoch, capped by train.max_steps."""
    total = config.train.epochs * steps_per_epoch(config)
    return total if config.train.max_steps is None else min(total, config.train.max_steps)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63))
    return torch.randperm(n, generator=g)


@dataclass
class _Progress:
    step: int = 0
    wall_s: float = 0.0
    steps_to_solve: int | None = None
    best_val: float = -1.0
    best_step: int = 0
    diverged_at: int | None = None  # the step whose training loss was not finite


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def check_run_dir(out: Path, config: BaseModel, resume: bool) -> None:
    """Refuse to overwrite a run, and refuse to resume a run made with another config."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a run directory")
    saved_config = out / "config.yaml"
    if not saved_config.exists():
        return
    if not resume:
        raise RunDirError(f"--out {out} already holds a run; pass --resume or choose another --out")
    # Compared as validated configs, not as text: a field added to the schema since the run
    # was saved takes its default on both sides, so older runs still resume.
    try:
        saved = type(config).model_validate(load_yaml(saved_config.read_text(encoding="utf-8")))
    except (ValidationError, yaml.YAMLError, UnicodeDecodeError):
        raise RunDirError(
            f"--resume: {saved_config} is not a readable config of this command; "
            "choose another --out"
        ) from None
    if saved != config:
        differences = config_differences(saved, config)
        raise RunDirError(
            f"--resume: the config differs from the one saved in {saved_config}: {differences}",
            differences,
        )


DATA_RECORD = "data.json"  # which generator drew a run's examples: {task, params, layout}


def _data_record(task: tasks.Task) -> dict:
    return {"task": task.name, "params": task.params, "layout": task.layout}


def check_run_data(out: Path, config: RunConfig) -> None:
    """Refuse a run directory whose examples this code would not draw again: the task's
    generator changed (``Task.layout``) since the run was made, so the same config now gives
    other data, and a finished run's result or a resumed run's weights would pass for this
    data's. A run from before layouts were recorded counts as layout 1."""
    if not (out / "config.yaml").exists():
        return
    now = _data_record(build_task(config))
    path = out / DATA_RECORD
    fix = "; choose another --out"
    saved = read_record(path, tuple(now), fix) if path.exists() else {"layout": 1}
    if saved["layout"] != now["layout"]:
        raise RunDirError(
            f"--out {out} was trained on {now['task']} examples of an earlier generator "
            f"(layout {saved['layout']}; this version draws layout {now['layout']}){fix}"
        )
    if any(saved[key] != value for key, value in now.items()):  # e.g. a changed default
        raise RunDirError(f"--out {out}: {path} names other task data than {now}{fix}")


def _leaves(data: dict, prefix: str = "") -> dict:
    """A nested dict as {"a.b": value}; an empty section has no leaves."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: BaseModel, config: BaseModel, limit: int = 3) -> str:
    """The first ``limit`` dotted fields that differ, as "train.lr: saved 0.001, now 0.002":
    one line that tells the user which override or edit to undo."""
    old, new = (_leaves(c.model_dump(mode="json")) for c in (saved, config))
    unset = object()  # a key only one side has (a free-form section such as mixer_params)
    keys = [k for k in {**old, **new} if old.get(k, unset) != new.get(k, unset)]

    def show(value) -> str:
        return "(unset)" if value is unset else json.dumps(value)

    parts = [f"{k}: saved {show(old.get(k, unset))}, now {show(new.get(k, unset))}" for k in keys]
    more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


# What every run's result.json holds (compare and sweeps read these).
RESULT_KEYS = ("test_accuracy", "test_exact", "val_accuracy", "steps", "solved", "wall_s", "params")


def read_result(run_dir: Path) -> dict:
    """A finished run's result.json; a one-line ValueError naming it when it is damaged."""
    fix = "; delete it to train the run again"
    return read_record(run_dir / "result.json", RESULT_KEYS, fix)


def _record(line: str) -> dict:
    """One metrics.jsonl line as its record, a JSON object with an integer "step": else
    json.JSONDecodeError for a line that is no JSON, ValueError for JSON that is no record."""
    record = json.loads(line)
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        raise ValueError(f"no object with an integer step: {line[:40]!r}")
    return record


def truncate_metrics(path: Path, last_step: int) -> list[dict]:
    """Drop records logged after the checkpoint we resume from (they will be redone); returns
    the records kept. Records are appended line by line, so a run killed mid-write leaves a
    torn last line: it is dropped too (its step is past the checkpoint, which is written
    after its records)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            records.append(_record(line))
        except ValueError as e:  # not a torn write: the file was changed
            raise ValueError(f"{path}: line {number} is not a JSON record ({e})") from None
    try:
        records += [_record(lines[-1])] if lines else []
    except json.JSONDecodeError:
        lines.pop()
    except ValueError as e:  # whole JSON, but no record: changed, not torn either
        raise ValueError(f"{path}: line {len(lines)} is not a JSON record ({e})") from None
    kept = [(ln, r) for ln, r in zip(lines, records) if r["step"] <= last_step]
    atomic_write_text(path, "".join(ln + "\n" for ln, _ in kept))
    return [r for _, r in kept]


def train(
    config: RunConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    lock_wait_s: float = 0.0,
) -> dict:
    """Train, validate, early-stop, test; write config.yaml, metrics.jsonl, result.json and
    checkpoints under ``out``. Returns the result dict (also in result.json). Another process
    writing in ``out`` is an error, at once or after waiting ``lock_wait_s`` for it to stop.

    ``on_eval(record)`` is called with each metrics record once it is written, before its
    checkpoint (a sweep reports it to Optuna: a run killed in between and resumed reports
    that step again rather than never); an exception it raises (optuna.TrialPruned) ends the
    run there and propagates."""
    out = Path(out)
    check_run_dir(out, config, resume)  # a file or another run: refused before making anything
    check_run_data(out, config)
    with lock_dir(out, wait_s=lock_wait_s):
        with torch_threads(config.threads):
            return _train(config, out, resume, progress, on_eval)


def _train(config, out: Path, resume: bool, progress: bool, on_eval) -> dict:
    check_run_dir(out, config, resume)  # again, now that no other process writes there
    check_run_data(out, config)
    if resume and (out / "result.json").exists():
        return read_result(out)  # finished already
    if resume:
        remove_stale_temps(out)
    device = resolve_device(config.device)
    task = build_task(config)
    splits = tasks.make_splits(
        task, config.task.num_train, config.task.num_valid, config.task.num_test, seed=config.seed
    )
    train_set, valid_set, test_set = (
        s.to(device) for s in (splits.train, splits.valid, splits.test)
    )
    model = build_model(config, task).to(device)
    cfg = config.train
    optimizer = make_optimizer(model, cfg)

    epoch_steps = steps_per_epoch(config)
    total = total_steps(config)
    eval_every = cfg.eval_every or epoch_steps

    state = _Progress()
    metrics_path = out / "metrics.jsonl"
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_resume_checkpoint(ckpt_path, info=("progress",), extra=("torch_rng",))
        load_model_weights(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["extra"]["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in ckpt["extra"]:  # dropout's, on a GPU
            torch.cuda.set_rng_state(ckpt["extra"]["cuda_rng"], device)
        state = _Progress(**ckpt["info"]["progress"])
        truncate_metrics(metrics_path, state.step)
    else:
        make_dir(out)
        atomic_write_text(out / DATA_RECORD, json.dumps(_data_record(task)))
        atomic_write_text(out / "config.yaml", dump_config(config))
        atomic_write_text(metrics_path, "")

    model.train()
    bar = tqdm(total=total, initial=state.step, disable=not progress, desc=config.model.mixer)
    loss_sum, loss_count = 0.0, 0
    t_start = time.perf_counter() - state.wall_s
    order, order_epoch = None, -1
    while state.step < total and state.steps_to_solve is None and state.diverged_at is None:
        epoch, pos = divmod(state.step, epoch_steps)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(config.seed, epoch, len(train_set)), epoch
        batch = train_set[order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].to(device)]
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(state.step, total, cfg)
        loss = training_step(model, optimizer, batch, cfg)
        state.step += 1
        loss_value = loss.item()
        loss_sum += loss_value
        loss_count += 1
        bar.update(1)
        if not math.isfinite(loss_value):
            # Diverged (an lr far too high, say): stop here rather than step on NaN weights
            # to the end of the budget; the result comes from the best weights before it.
            state.diverged_at = state.step

        if state.step % eval_every == 0 or state.step == total or state.diverged_at:
            val = evaluate(model, valid_set, cfg.eval_batch_size)
            state.wall_s = time.perf_counter() - t_start
            if cfg.target_accuracy is not None and val["accuracy"] >= cfg.target_accuracy:
                state.steps_to_solve = state.step
            record = {
                "step": state.step,
                "epoch": state.step / epoch_steps,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / loss_count,
                "val_accuracy": val["accuracy"],
                "val_exact": val["exact"],
                "val_loss": val["loss"],
                "wall_s": state.wall_s,
            }
            with open(metrics_path, "a") as f:  # NaN is no JSON: a diverged loss is null
                f.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            if on_eval is not None:
                on_eval(record)
            if val["accuracy"] > state.best_val and not state.diverged_at:
                state.best_val, state.best_step = val["accuracy"], state.step
                if cfg.restore_best:
                    save_checkpoint(out / BEST, model)
            save_checkpoint(
                ckpt_path,
                model,
                optimizer,
                extra_tensors=_rng_states(device),
                info={"progress": vars(state)},
            )
            bar.set_postfix(loss=f"{record['train_loss']:.3g}", val_acc=f"{val['accuracy']:.3f}")
            loss_sum, loss_count = 0.0, 0
    bar.close()

    if cfg.restore_best and (out / BEST).exists():
        # Model selection on the validation split only: the test split is read once, here.
        load_model_weights(model, load_checkpoint(out / BEST)["model"])
    val = evaluate(model, valid_set, cfg.eval_batch_size)
    test = evaluate(model, test_set, cfg.eval_batch_size)
    result = {
        "task": config.task.name,
        "mixer": config.model.mixer,
        "seed": config.seed,
        "test_accuracy": test["accuracy"],
        "test_exact": test["exact"],
        "val_accuracy": val["accuracy"],
        "steps": state.step,
        "epochs": state.step / epoch_steps,
        "solved": state.steps_to_solve is not None,
        "steps_to_solve": state.steps_to_solve,
        "best_step": state.best_step,
        "diverged_at": state.diverged_at,
        "wall_s": state.wall_s,
        "params": model.num_params(),
        "random_accuracy": task.random_accuracy,
        "threads": torch.get_num_threads(),  # CPU numbers depend on it (threads: null varies)
    }
    save_checkpoint(out / WEIGHTS, model, info={"config": config.model_dump(mode="json")})
    atomic_write(
        out / "result.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2))
    )
    return result
