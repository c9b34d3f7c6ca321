"""``sandbox pretrain``: language-model pretraining on the token files of ``sandbox prepare-data``.

One process, or one per device under ``torchrun`` (DDP, or FSDP2 with ``train.fsdp``). Step s
trains on a global batch of ``global_batch_tokens / seq_len`` windows of seq_len + 1 tokens whose
start offsets are drawn from a generator seeded by (seed, s); row block (rank, micro-step) of it
goes to that process and gradient-accumulation step. So the data depend only on the step, a
resumed run sees exactly the batches an uninterrupted one would, and W processes x A micro-steps
train on the same batch as one process x W*A micro-steps. Dropout's RNG is reseeded from
(seed, step, global micro-batch) before every micro-batch for the same reason.

A run directory holds config.yaml (fully resolved), metrics.jsonl (one JSON object per log or
evaluation step: train_loss, lr, tokens_per_s and mfu at log steps, val_loss and val_ppl at
evaluations),
checkpoint.safetensors (weights, optimizer, step; written atomically by rank 0), and at the end
model.safetensors (weights and config: what :func:`load_pretrained` reads) and result.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from tqdm.auto import tqdm

import layers
from sandbox import distributed
from sandbox.config import ConfigError, dump_config
from sandbox.data.dataset import TokenFile
from sandbox.data.prepare import DataError
from sandbox.data.tokenizer import get_tokenizer
from sandbox.io import (
    atomic_write_text,
    load_checkpoint,
    load_model_weights,
    load_resume_checkpoint,
    lock_dir,
    make_dir,
    read_record,
    remove_stale_temps,
    save_state,
)
from sandbox.model import LanguageModel
from sandbox.pretrain_config import TOKENIZER_VOCAB, PretrainConfig, total_steps, vocab_size
from sandbox.train import (
    CHECKPOINT,
    WEIGHTS,
    check_run_dir,
    lr_factor,
    make_optimizer,
    torch_threads,
    truncate_metrics,
)


def build_model(config: PretrainConfig) -> LanguageModel:
    torch.manual_seed(config.seed)  # initialisation is part of what the seed fixes
    return LanguageModel(config.model, vocab_size(config.data), max_seq_len=config.data.seq_len)


def accumulation_steps(config: PretrainConfig, world: int) -> int:
    """Micro-steps per optimizer step so that every step trains on global_batch_tokens."""
    seq, micro = config.data.seq_len, config.train.micro_batch_size
    per_pass = seq * micro * world
    if config.train.global_batch_tokens % per_pass:
        raise ConfigError(
            f"config field 'train.global_batch_tokens': {config.train.global_batch_tokens} is not "
            f"a multiple of data.seq_len x train.micro_batch_size x processes = {seq} x {micro} "
            f"x {world} = {per_pass}"
        )
    return config.train.global_batch_tokens // per_pass


def open_data(config: PretrainConfig, world: int = 1) -> dict[str, TokenFile]:
    """The train and val token files of data.dir, checked against the config."""
    root, seq = Path(config.data.dir), config.data.seq_len
    if root.exists() and not root.is_dir():
        raise DataError(f"data.dir {str(root)!r} is not a directory (give prepare-data's --out)")
    if not root.is_dir():
        raise DataError(
            f"data.dir {str(root)!r} does not exist; make it with "
            f"`sandbox prepare-data FILES --out {root}`"
        )
    if not (root / "index.json").is_file():
        raise DataError(f"data.dir {str(root)!r} has no index.json: prepare-data has not finished")
    try:
        index = json.loads((root / "index.json").read_text())
        # operator.index, not int: a float (a hand-edited index) is refused, not truncated.
        name, vocab = index["tokenizer"]["name"], operator.index(index["tokenizer"]["vocab_size"])
        files = {s: root / index["splits"][s]["file"] for s in ("train", "val")}
        counts = {s: operator.index(index["splits"][s]["tokens"]) for s in ("train", "val")}
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(
            f"data.dir {str(root)!r}: index.json is not a prepare-data index ({e!r})"
        ) from None
    if name != config.data.tokenizer:
        raise DataError(
            f"data.tokenizer is {config.data.tokenizer!r} but {root} was prepared with {name!r}"
        )
    if vocab > vocab_size(config.data):
        raise DataError(
            f"data.dir {str(root)!r}: token ids up to {vocab - 1} do not fit "
            f"the model's vocabulary of {vocab_size(config.data)}"
        )
    for split, path in files.items():
        if not path.is_file():
            raise DataError(f"data.dir {str(root)!r}: the {split} split's {path.name} is missing")
    splits = {s: TokenFile(path) for s, path in files.items()}
    for s, tokens in splits.items():
        if len(tokens) != counts[s]:  # changed since prepare-data finished (appended, cut)
            raise DataError(
                f"data.dir {str(root)!r}: {files[s].name} holds {len(tokens)} tokens, "
                f"index.json says {counts[s]}; prepare it again"
            )
    if len(splits["train"]) <= seq:
        raise DataError(
            f"data.dir {str(root)!r}: the train split has {len(splits['train'])} tokens, "
            f"fewer than data.seq_len + 1 = {seq + 1}"
        )
    if config.train.eval_every and not _eval_starts(config, splits["val"], 0, world)[1].any():
        raise DataError(
            f"data.dir {str(root)!r}: the val split ({len(splits['val'])} tokens) has no window "
            f"of data.seq_len + 1 = {seq + 1} tokens; set train.eval_every=null "
            "or prepare a val split"
        )
    return splits


def _windows(tokens: TokenFile, starts: np.ndarray, seq_len: int, tokenizer: str) -> torch.Tensor:
    """int64 [len(starts), seq_len + 1]: the windows starting at ``starts``, checked against
    the tokenizer's vocabulary: a clear error rather than an index error (or CUDA assert), and
    not the model's padded one, whose extra rows no tokenizer produces (ids there are
    corruption that would train silently)."""
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    vocab = TOKENIZER_VOCAB[tokenizer]
    if rows.max() >= vocab:
        raise DataError(
            f"{tokens.path}: token id {rows.max()} is past the {tokenizer} tokenizer's "
            f"vocabulary of {vocab}"
        )
    return torch.from_numpy(rows)


def train_starts(seed: int, step: int, n_tokens: int, seq_len: int, rows: int) -> np.ndarray:
    """Start offsets of step ``step``'s global batch: ``rows`` windows of seq_len + 1 tokens
    drawn uniformly from a file of ``n_tokens``."""
    return np.random.default_rng([seed, step]).integers(0, n_tokens - seq_len, size=rows)


def _eval_starts(config: PretrainConfig, val: TokenFile, rank: int, world: int):
    """This process's share of the fixed validation windows: consecutive, non-overlapping
    windows from the start of val, eval_tokens in all at most, the same set under any number
    of processes. Returns (starts, counted): every process gets ceil(windows / world) of them
    (FSDP's forward is a collective); the padding at the end repeats a window and is not
    counted."""
    seq = config.data.seq_len
    n = min(config.train.eval_tokens // seq, max(0, len(val) - 1) // seq)
    per = -(-n // world)
    i = np.arange(rank * per, (rank + 1) * per)
    return np.minimum(i, max(n - 1, 0)) * seq, i < n


def flops_per_token(model: LanguageModel, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's convention: 6 N plus 12 x d_model x seq_len per
    attention layer (scores and values, forward and backward). Convolutions are not counted."""
    n_attn = sum(isinstance(b.mixer, layers.Attention) for b in model.blocks)
    return 6 * model.num_params() + 12 * n_attn * model.config.d_model * seq_len


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: time what has finished
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def evaluate(model, val: TokenFile, config: PretrainConfig, d: distributed.Dist, autocast) -> dict:
    """Mean next-token loss (and perplexity) over the fixed validation windows, all processes."""
    seq, micro, tokenizer = (
        config.data.seq_len,
        config.train.micro_batch_size,
        config.data.tokenizer,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # loss sum, tokens
    model.eval()
    starts, counted = _eval_starts(config, val, d.rank, d.world)
    for i in range(0, len(starts), micro):
        w = _windows(val, starts[i : i + micro], seq, tokenizer).to(d.device)
        with autocast:
            logits = model(w[:, :-1])
        targets = w[:, 1:].clone()
        targets[torch.from_numpy(~counted[i : i + micro]).to(d.device)] = -100  # padding
        totals[0] += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        )
        totals[1] += (targets != -100).sum()
    model.train()
    loss_sum, tokens = distributed.all_sum(totals, d)
    loss = float(loss_sum / tokens)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}  # no OverflowError


def _save(path: Path, model, optimizer, d: distributed.Dist, info: dict) -> None:
    """Write full weights (+ optimizer state) from rank 0; under FSDP every process gathers."""
    if d.main or distributed.is_sharded(model):
        state = distributed.model_state(model)
        optim = distributed.optimizer_state(optimizer) if optimizer is not None else None
        if d.main:
            save_state(path, state, optim, info=info)


def _tensorboard(out: Path, d: distributed.Dist, step: int):
    """A SummaryWriter on rank 0 when tensorboard is installed, else None. The run goes on
    from ``step``: TensorBoard drops the events an earlier session logged after it (purge_step),
    as truncate_metrics drops its log lines; they are logged again, and were shown twice."""
    if not d.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)


class _Throughput:
    """Training time between logs, evaluations and checkpoints left out."""

    def __init__(self, device: torch.device):
        self.device, self.mark, self.paused = device, _now(device), 0.0
        self.tokens, self.seconds = 0, 0.0  # this session's totals

    @contextlib.contextmanager
    def pause(self):
        t = _now(self.device)
        yield
        self.paused += _now(self.device) - t

    def lap(self, tokens: int) -> float:
        """Tokens per second since the last lap."""
        now = _now(self.device)
        seconds = now - self.mark - self.paused
        self.mark, self.paused = now, 0.0
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        return tokens / seconds


def _train_step(model, optimizer, step, starts, train_tokens, config, d, accumulation, autocast):
    """Optimizer step ``step`` on this process's rows of its global batch (``starts``: the start
    offsets of all rows); returns the sum of the micro-batch mean losses (a tensor, not
    synchronised)."""
    seq, micro, tokenizer = (
        config.data.seq_len,
        config.train.micro_batch_size,
        config.data.tokenizer,
    )
    loss_sum = torch.zeros((), device=d.device)
    for m in range(accumulation):
        block = d.rank * accumulation + m  # the global micro-batch: rows block*micro onwards
        # Dropout's RNG from (seed, step, block): its masks depend on the rows alone, not on
        # how they are spread over processes and micro-steps, nor on a resume.
        torch.manual_seed(
            int(np.random.SeedSequence([config.seed, step, block]).generate_state(1)[0])
        )
        first = block * micro
        w = _windows(train_tokens, starts[first : first + micro], seq, tokenizer).to(d.device)
        with distributed.no_sync(model, sync=m == accumulation - 1):
            with autocast:
                logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
            (loss / accumulation).backward()
        loss_sum += loss.detach()
    if config.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def pretrain(
    config: PretrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Pretrain under ``out`` (see the module docstring); returns result.json's content.

    Under torchrun every process calls this with the same arguments. ``on_step(step)`` is for
    tests: called after each optimizer step once its log, evaluation and checkpoint are written.
    """
    d = distributed.setup(config.device)
    out = Path(out)
    try:
        if not d.main:  # rank 0 alone writes, and holds the directory's lock for its job
            with torch_threads(config.threads):
                return _pretrain(config, out, resume, progress, on_step, d)
        check_run_dir(out, config, resume)  # a file or another run: refused before making it
        with lock_dir(out), torch_threads(config.threads):
            return _pretrain(config, out, resume, progress, on_step, d)
    finally:
        distributed.teardown(d)


def _pretrain(config, out: Path, resume: bool, progress: bool, on_step, d) -> dict:
    cfg = config.train
    accumulation = accumulation_steps(config, d.world)
    splits = open_data(config, d.world)
    check_run_dir(out, config, resume)
    if resume and (out / "result.json").exists():  # finished already
        return read_record(out / "result.json", ("steps",), "; delete it to finish the run again")
    distributed.barrier(d)  # every process has checked the directory before rank 0 writes to it
    if resume and d.main:
        remove_stale_temps(out)

    model = build_model(config)
    fpt = flops_per_token(model, config.data.seq_len)
    metrics_path, ckpt_path = out / "metrics.jsonl", out / CHECKPOINT
    step, wall_s, ckpt, logged = 0, 0.0, None, []
    if resume and ckpt_path.exists():
        ckpt = load_resume_checkpoint(ckpt_path, info=("step", "wall_s"))
        load_model_weights(model, ckpt["model"])
        step, wall_s = ckpt["info"]["step"], ckpt["info"]["wall_s"]
        if d.main:
            logged = truncate_metrics(metrics_path, step)
    elif d.main:
        make_dir(out)
        atomic_write_text(out / "config.yaml", dump_config(config))
        atomic_write_text(metrics_path, "")
    model = distributed.wrap(model.to(d.device), d, cfg.fsdp)
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        distributed.load_optimizer_state(optimizer, ckpt["optim"])
        del ckpt
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)
    tensorboard = _tensorboard(out, d, step)

    total, rows = total_steps(cfg), cfg.micro_batch_size * accumulation * d.world
    peak_flops = cfg.peak_tflops * 1e12 * d.world if cfg.peak_tflops else None
    info = {"config": config.model_dump(mode="json")}
    meter, t_start = _Throughput(d.device), time.perf_counter() - wall_s
    loss_sum, last_log = torch.zeros((), device=d.device), step
    # Resumed from the final checkpoint (killed before the weights or result.json were written),
    # no step runs: the result's losses are those of the last record, logged at that step.
    record = logged[-1] if logged and logged[-1]["step"] == step else {}
    bar = tqdm(total=total, initial=step, disable=not (progress and d.main), desc="pretrain")
    model.train()
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, total, cfg)
        starts = train_starts(config.seed, step, len(splits["train"]), config.data.seq_len, rows)
        loss_sum += _train_step(
            model, optimizer, step, starts, splits["train"], config, d, accumulation, autocast
        )
        step += 1
        bar.update(1)

        record = {}
        if step % cfg.log_every == 0 or step == total:
            steps = step - last_log
            mean = float(distributed.all_sum(loss_sum, d)) / (steps * accumulation * d.world)
            tokens_per_s = meter.lap(steps * cfg.global_batch_tokens)
            record.update(
                train_loss=mean,
                lr=optimizer.param_groups[0]["lr"],
                tokens_per_s=tokens_per_s,
                mfu=fpt * tokens_per_s / peak_flops if peak_flops else None,
            )
            loss_sum.zero_()
            last_log = step
            bar.set_postfix(loss=f"{mean:.3f}")
            if not math.isfinite(mean):  # every rank sees the same all-reduced mean
                # Stop before a checkpoint of the diverged weights replaces the last good one.
                raise ValueError(
                    f"pretrain: the training loss is {mean} over steps {step - steps + 1}-{step}: "
                    "the run diverged (lower train.lr); no checkpoint of its weights was written"
                )
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            with meter.pause():
                record.update(evaluate(model, splits["val"], config, d, autocast))
        if record and d.main:
            record = {"step": step, "tokens": step * cfg.global_batch_tokens, **record}
            record["wall_s"] = time.perf_counter() - t_start
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if tensorboard is not None:
                for key, value in record.items():
                    if key != "step" and value is not None:
                        tensorboard.add_scalar(key, value, step)
        if step % cfg.checkpoint_every == 0 or step == total:
            with meter.pause():
                progress_info = {"step": step, "wall_s": time.perf_counter() - t_start}
                _save(ckpt_path, model, optimizer, d, {**info, **progress_info})
        if on_step is not None:
            on_step(step)
    bar.close()

    _save(out / WEIGHTS, model, None, d, {**info, "step": step})
    result = {
        "steps": step,
        "tokens": step * cfg.global_batch_tokens,
        "params": distributed.unwrap(model).num_params(),
        "train_loss": record.get("train_loss"),
        "val_loss": record.get("val_loss"),
        "val_ppl": record.get("val_ppl"),
        "tokens_per_s": meter.tokens / meter.seconds if meter.seconds else None,
        "wall_s": time.perf_counter() - t_start,
        "processes": d.world,
        "threads": torch.get_num_threads(),  # per process; CPU numbers depend on it
    }
    if d.main:
        atomic_write_text(out / "result.json", json.dumps(result, indent=2))
        if tensorboard is not None:
            tensorboard.close()
    return result


def load_pretrained(path: str | Path, device: str = "cpu") -> tuple[LanguageModel, object]:
    """A trained model (eval mode) and its tokenizer, from a pretrain run directory or a
    checkpoint file in one (model.safetensors once finished, else checkpoint.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS if (path / WEIGHTS).exists() else path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no pretrain checkpoint at {str(path)!r}")
    ckpt = load_checkpoint(path)
    try:
        config = PretrainConfig.model_validate(ckpt["info"]["config"])
    except (KeyError, ValidationError):  # e.g. a synthetic `sandbox train` checkpoint
        raise ValueError(f"{str(path)!r} is not a `sandbox pretrain` checkpoint") from None
    model = build_model(config)
    load_model_weights(model, ckpt["model"])
    return model.to(device).eval(), get_tokenizer(config.data.tokenizer)
