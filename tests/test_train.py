"""Trainer, checkpoints and the `sandbox train` CLI on tiny models."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import tasks
from sandbox.cli import main
from sandbox.config import build_config
from sandbox.io import atomic_write_text, remove_stale_temps
from sandbox.model import LanguageModel
from sandbox.train import (
    build_task,
    evaluate,
    lm_loss,
    lr_factor,
    make_optimizer,
    train,
    training_step,
)

TINY = {
    "seed": 3,
    "threads": 1,
    "task": {"name": "associative_recall", "num_train": 256, "num_valid": 64, "num_test": 64},
    "model": {"mixer": "h3", "d_model": 16, "mixer_params": {"d_state": 8}},
    "train": {"lr": 3.0e-3, "batch_size": 32, "epochs": 4, "eval_every": 8},
}


def tiny(**train_overrides):
    data = json.loads(json.dumps(TINY))
    data["train"].update(train_overrides)
    return build_config(data)


def test_lr_schedule_hand_values():
    cfg = build_config({"train": {"warmup_frac": 0.1, "schedule": "cosine"}}).train
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.5)  # halfway through the cosine
    lin = build_config({"train": {"warmup_frac": 0.0, "schedule": "linear", "min_lr_frac": 0.1}})
    assert lr_factor(50, 100, lin.train) == pytest.approx(0.1 + 0.9 * 0.5)
    # 29 warmup steps, though 0.29 * 100 is 28.999999999999996 in floating point.
    odd = build_config({"train": {"warmup_frac": 0.29}}).train
    assert lr_factor(27, 100, odd) == pytest.approx(28 / 29) and lr_factor(28, 100, odd) == 1.0


def test_evaluate_hand_checked():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, ids):
            return self.logits[ids[:, 0]]  # each example's row, so chunks see their own

    inputs = torch.tensor([[0, 0, 0], [1, 1, 1]])  # row index of each example
    targets = torch.tensor([[1, 2, 3], [3, 2, 1]])
    mask = torch.tensor([[False, True, True], [False, True, True]])
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = logits[0, 2, 3] = 1  # example 0: both answers right
    logits[1, 1, 2] = logits[1, 2, 0] = 1  # example 1: one right, one wrong
    batch = tasks.Batch(inputs, targets, mask)
    expected_loss = -torch.log_softmax(logits, -1)[mask].gather(1, targets[mask][:, None]).mean()
    for batch_size in (500, 1):  # one chunk, and one chunk per example
        m = evaluate(Fixed(logits), batch, batch_size)
        assert m["accuracy"] == pytest.approx(3 / 4)
        assert m["exact"] == pytest.approx(1 / 2)
        assert m["loss"] == pytest.approx(float(expected_loss))


def test_lm_loss_all_tokens_or_answers_only():
    targets = torch.tensor([[1, 2, -100], [0, 3, 1]])
    mask = torch.tensor([[False, True, False], [False, False, True]])
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = tasks.Batch(torch.zeros(2, 3, dtype=torch.long), targets, mask)
    nll = -torch.log_softmax(logits, -1)
    every = (nll[0, 0, 1] + nll[0, 1, 2] + nll[1, 0, 0] + nll[1, 1, 3] + nll[1, 2, 1]) / 5
    assert float(lm_loss(logits, batch, "all")) == pytest.approx(float(every))
    answers = (nll[0, 1, 2] + nll[1, 2, 1]) / 2
    assert float(lm_loss(logits, batch, "answers")) == pytest.approx(float(answers))


@pytest.mark.parametrize("copied", [False, True])
def test_ssm_parameters_get_their_own_group(copied):
    from sandbox.model import LanguageModel

    model = LanguageModel(tiny().model, vocab_size=10, max_seq_len=20)
    if copied:  # new Parameter objects, which once lost the SSM flag and got weight decay
        model = copy.deepcopy(model)
    opt = make_optimizer(model, build_config({"train": {"lr": 5e-3}}).train)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {
        (g["lr"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in opt.param_groups
    }
    # by hand: H3's diagonal SSM's dt, A and B in each of the 2 blocks (C and D: ordinary weights)
    ssm = {
        f"blocks.{i}.mixer.kv_ssm.{p}"
        for i in range(2)
        for p in ("log_dt", "log_A_real", "A_imag", "B")
    }
    assert groups[(1e-3, 0.0)] == ssm
    assert all(p.dim() >= 2 for n, p in model.named_parameters() if n in groups[(5e-3, 0.1)])
    assert sum(len(v) for v in groups.values()) == len(names)


def test_weight_decay_only_on_weight_matrices():
    # By hand, for a Hyena + attention model: decayed are the Linear weights and Hyena's short
    # conv taps; Hyena's skip terms (one [order, D] "bias"), every other bias, the norms and
    # the embeddings are not.
    from sandbox.model import LanguageModel

    config = build_config(
        {"model": {"mixer": "hyena", "d_model": 16, "n_layers": 2, "attn_layers": [1]}}
    )
    model = LanguageModel(config.model, vocab_size=10, max_seq_len=20)
    opt = make_optimizer(model, config.train)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    linears = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    } - {"head.weight"}  # tied to the embedding
    assert decayed == linears | {"blocks.0.mixer.short_weight"}
    assert "blocks.0.mixer.bias" in names.values()


def test_loss_decreases(tmp_path):
    result = train(tiny(epochs=6), tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.2
    assert result["steps"] == 6 * math.ceil(256 / 32)
    for name in ("config.yaml", "metrics.jsonl", "result.json", "model.safetensors"):
        assert (tmp_path / "run" / name).exists()
    # restore_best: the reported model is the first evaluation of the highest validation accuracy.
    best = max(records, key=lambda r: (r["val_accuracy"], -r["step"]))
    assert result["best_step"] == best["step"]
    assert result["val_accuracy"] == pytest.approx(best["val_accuracy"])
    # The schedule reaches the optimizer: each record's lr is that of its last step (lr_factor
    # itself is checked against hand values above).
    cfg = tiny(epochs=6).train
    for r in records:
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(r["step"] - 1, result["steps"], cfg))
    # Early stop: the same run with target_accuracy at its best validation accuracy stops at
    # the first evaluation reaching it, having logged exactly the records up to there.
    stopped = train(
        tiny(epochs=6, target_accuracy=best["val_accuracy"]), tmp_path / "s", progress=False
    )
    assert stopped["solved"] and stopped["steps_to_solve"] == stopped["steps"] == best["step"]
    early = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert _strip_wall(early) == _strip_wall([r for r in records if r["step"] <= best["step"]])


def _strip_wall(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    config = tiny(epochs=60)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    reference = train(config, tmp_path / "ref", progress=False)

    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "sandbox.cli",
        "train",
        str(cfg_path),
        "--out",
        str(run),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists(), "the run finished before it could be killed"

    assert main(["train", str(cfg_path), "--out", str(run), "--resume", "--quiet"]) == 0
    resumed = json.loads((run / "result.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "wall_s"} == {
        k: v for k, v in reference.items() if k != "wall_s"
    }
    ref_metrics = [
        json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]
    res_metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert _strip_wall(res_metrics) == _strip_wall(ref_metrics)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["model"].update(d_modle=32), "model.d_modle"),
        (lambda d: d["train"].update(lr="fast"), "train.lr"),
        (lambda d: d["task"].update(params={"vocab_size": 3}), "vocab_size"),
        (lambda d: d["model"]["mixer_params"].update(head_dimm=2), "head_dimm"),
    ],
)
def test_cli_bad_config_exits_2_naming_field(tmp_path, capsys, mutate, field):
    data = json.loads(json.dumps(TINY))
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(epochs=1).model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", str(path), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    changed = tiny(epochs=2)
    path.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    assert main(["train", str(path), "--out", str(out), "--resume", "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(a_file), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep"


def test_cli_out_that_cannot_be_made_exits_2(tmp_path, capsys):
    """--out below a file: one line naming it, exit 2 (was a traceback), for train, compare
    and sweep (prepare-data: test_prepare_data; pretrain makes it through the same make_dir)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(epochs=1).model_dump(mode="json")))
    bad = str(a_file / "sub")
    for argv in (
        ["train", str(config), "--out", bad, "--quiet"],
        ["compare", "--out", bad, "--quiet"],
        ["sweep", str(Path(__file__).parents[1] / "sweeps" / "smoke.yaml"), "--out", bad],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert f"--out '{bad}': cannot make the directory" in err and len(err.splitlines()) == 1
    assert a_file.read_text() == "keep"


def test_resume_refuses_checkpoints_it_cannot_continue(tmp_path, capsys):
    """--resume from a checkpoint of another model, from final weights copied into its place,
    or from a safetensors file of another layout: one line naming the problem and exit 2 (were
    tracebacks: a size mismatch, None optimizer state, KeyError), the run directory untouched.
    A temp file left by a kill mid-write goes at the next resume."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(epochs=1).model_dump(mode="json")))
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["train", str(config), "model.d_model=8", "--out", str(other), "--quiet"]) == 0
    for name in ("result.json", "model.safetensors"):  # as if killed before the end
        (run / name).unlink()
    ckpt = run / "checkpoint.safetensors"
    original = ckpt.read_bytes()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, foreign, metadata={"json": '{"info": {}}'})
    for source, message in [
        (other / "checkpoint.safetensors", "checkpoint does not match the model: "),
        (run / "best.safetensors", "is not a checkpoint of this command (no progress, "),
        (foreign, "is not a sandbox checkpoint (tensor 'encoder.weight'"),
    ]:
        ckpt.write_bytes(source.read_bytes())
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        assert main(["train", str(config), "--out", str(run), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    ckpt.write_bytes(original)
    stale = run / ".checkpoint.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet"]) == 0
    assert not stale.exists() and (run / "result.json").exists()


def test_truncate_metrics_drops_later_records_and_a_torn_line(tmp_path):
    from sandbox.train import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed mid-write
    assert truncate_metrics(path, 4) == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}]
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert truncate_metrics(path, 9) == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}]
    assert truncate_metrics(tmp_path / "none.jsonl", 3) == []
    # A damaged line before the last is no torn write: named, and the file left as it is.
    path.write_text(lines[0] + '\n{"step": 4 "loss"}\n' + lines[2] + "\n")
    before = path.read_text()
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        truncate_metrics(path, 9)
    assert path.read_text() == before
    # JSON that is no record, at any line (it was a TypeError or KeyError traceback).
    for bad in ("[2]", "null", "{}", '{"step": "5"}'):
        for number, text in (
            (2, f"{lines[0]}\n{bad}\n{lines[2]}\n"),
            (3, f"{lines[0]}\n{lines[1]}\n{bad}\n"),
        ):
            path.write_text(text)
            with pytest.raises(ValueError, match=f"line {number} is not a JSON record"):
                truncate_metrics(path, 9)
            assert path.read_text() == text


def test_console_script_exit_code(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  mixer: h3\n  n_layer: 2\n")
    proc = subprocess.run(["sandbox", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sandbox: error: config field 'model.n_layer': unknown key"


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    plain = tmp_path / "b.txt"
    plain.write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode == plain.stat().st_mode
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".*tmp"))


def test_a_write_killed_before_its_rename_leaves_only_what_resume_removes(tmp_path):
    # safetensors' save_file writes its own temp file (".tmpXXXXXX") beside the name it gets and
    # renames it onto that name; killed in between, that full-size file stayed in the run
    # directory, where nothing removed it.
    script = f"""
import os, signal
from pathlib import Path
from sandbox.io import atomic_write
def write(tmp):
    (Path(tmp).parent / ".tmpAbC123").write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
atomic_write(Path({str(tmp_path)!r}) / "checkpoint.safetensors", write)
"""
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(tmp_path.iterdir())) == 2  # keep.txt and the killed write's leftovers
    remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_write_flushes_the_file_before_its_rename_and_the_directory_after(
    tmp_path, monkeypatch
):
    # Without fsync a host crash can leave the renamed checkpoint empty, the old one gone.
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "r.json", "{}")
    assert events == [("fsync", "r.json"), ("replace", "r.json"), ("fsync", tmp_path.name)]
    assert (tmp_path / "r.json").read_text() == "{}"


def test_resume_accepts_an_older_saved_config_and_refuses_a_different_one(tmp_path):
    from sandbox.train import RunDirError, check_run_dir

    config = tiny()
    old = config.model_dump(mode="json")
    del old["model"]["init"]  # a run saved before the field existed: it takes the default
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_run_dir(tmp_path, config, resume=True)
    with pytest.raises(RunDirError, match="config differs"):
        check_run_dir(tmp_path, tiny(lr=1e-2), resume=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        check_run_dir(tmp_path, config, resume=False)


def test_a_run_of_an_earlier_task_generator_is_refused(tmp_path):
    """data.json records which generator drew a run's examples; a finished run or a checkpoint
    from another layout of the task (a run dir made before AR followed Safari's query law, with
    no data.json) is refused instead of passing for this data's result."""
    from sandbox.train import RunDirError

    config, out = tiny(epochs=1, eval_every=None), tmp_path / "run"
    result = train(config, out, progress=False)
    task = build_task(config)
    assert json.loads((out / "data.json").read_text()) == {
        "task": "associative_recall",
        "params": {"vocab_size": 10, "seq_len": 22},
        "layout": task.layout,
    }
    assert train(config, out, resume=True, progress=False) == result  # the same data: reused
    (out / "data.json").unlink()  # as a run made before layouts were recorded
    with pytest.raises(RunDirError, match=r"earlier generator \(layout 1; this version draws"):
        train(config, out, resume=True, progress=False)
    (out / "data.json").write_text(json.dumps({"task": "x", "params": {}, "layout": task.layout}))
    with pytest.raises(RunDirError, match="names other task data"):
        train(config, out, resume=True, progress=False)
    assert json.loads((out / "result.json").read_text()) == result  # nothing overwritten


@pytest.mark.parametrize("clip", [None, 0.05])
def test_training_step_clips_the_gradient_norm(clip):
    # With plain SGD at lr 1 a step moves the weights by exactly the (clipped) gradient.
    config = tiny(grad_clip=clip)
    task = build_task(config)
    batch = task.generate(num_examples=8, seed=0)
    torch.manual_seed(0)
    model = LanguageModel(config.model, task.vocab_size, task.seq_len).double()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    model.zero_grad()
    lm_loss(model(batch.inputs), batch, "all").backward()
    raw = torch.cat([p.grad.flatten() for p in params]).norm()
    assert raw > 0.1  # the clip below bites
    training_step(model, torch.optim.SGD(params, lr=1.0), batch, config.train)
    moved = torch.cat([(b - p.detach()).flatten() for p, b in zip(params, before)]).norm()
    assert float(moved) == pytest.approx(float(raw) if clip is None else clip, rel=1e-5)


# --- the trainer's documented rules, each pinned on a small run (64 / 32 / 32 examples in
# batches of 16: 4 steps an epoch, 3 epochs, an evaluation every 4 steps)


def small(dropout: float = 0.0, **train_overrides):
    data = json.loads(json.dumps(TINY))
    data["task"].update(num_train=64, num_valid=32, num_test=32)
    data["model"]["dropout"] = dropout
    data["train"].update({"batch_size": 16, "epochs": 3, "eval_every": 4, **train_overrides})
    return build_config(data)


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ssm_group_lr_is_the_smaller_of_ssm_lr_and_lr():
    """README: SSM parameters train at lr min(ssm_lr, lr); h3-table2 trains at 5e-4 < 1e-3."""
    config = small(lr=5e-4)
    model = LanguageModel(config.model, vocab_size=10, max_seq_len=22)
    groups = make_optimizer(model, config.train).param_groups
    ssm = {id(p) for n, p in model.named_parameters() if n.endswith(("log_dt", "A_imag", "A_real"))}
    assert ssm
    assert {g["lr"] for g in groups if any(id(p) in ssm for p in g["params"])} == {5e-4}


def test_the_last_step_is_evaluated_when_the_cap_is_no_multiple_of_eval_every(tmp_path):
    result = train(small(max_steps=10), tmp_path / "r", progress=False)
    assert result["steps"] == 10 and [r["step"] for r in records_of(tmp_path / "r")] == [4, 8, 10]


def test_each_epoch_is_a_new_order_of_the_training_set(tmp_path, monkeypatch):
    """Every epoch covers the training split once, each in another order."""
    import sandbox.train as trainer

    seen, real = [], trainer.training_step

    def spy(model, optimizer, batch, cfg):
        seen.append(batch.inputs.clone())
        return real(model, optimizer, batch, cfg)

    monkeypatch.setattr(trainer, "training_step", spy)
    config = small()
    train(config, tmp_path / "r", progress=False)
    split = tasks.make_splits(build_task(config), 64, 32, 32, seed=config.seed).train.inputs
    epochs = [torch.cat(seen[4 * e : 4 * e + 4]) for e in range(3)]
    rows = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert all(rows(e) == rows(split) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_train_loss_is_the_mean_since_the_last_evaluation(tmp_path, monkeypatch):
    import sandbox.train as trainer

    losses, real = [], trainer.training_step

    def spy(*args):
        loss = real(*args)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(trainer, "training_step", spy)
    train(small(), tmp_path / "r", progress=False)
    for r in records_of(tmp_path / "r"):
        assert r["train_loss"] == pytest.approx(sum(losses[r["step"] - 4 : r["step"]]) / 4)


def test_a_tie_keeps_the_first_best_evaluation(tmp_path):
    """At lr 1e-12 no prediction changes, so every evaluation ties: the first one is best."""
    result = train(small(lr=1e-12, ssm_lr=1e-12), tmp_path / "r", progress=False)
    records = records_of(tmp_path / "r")
    assert len(records) == 3 and len({r["val_accuracy"] for r in records}) == 1
    assert result["best_step"] == 4


def test_warmup_is_the_floor_of_warmup_frac_times_total():
    cfg = build_config({"train": {"warmup_frac": 0.1}}).train
    # 0.1 * 45 = 4.5 -> 4 warmup steps: step 0 at 1/4, step 3 the first at full lr.
    assert lr_factor(0, 45, cfg) == pytest.approx(1 / 4)
    assert lr_factor(3, 45, cfg) == pytest.approx(1.0) == lr_factor(4, 45, cfg)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_after_a_kill_between_a_record_and_its_checkpoint(tmp_path, dropout):
    """on_eval runs after a record is written and before its checkpoint: raising there is a
    kill in that window. The resumed run drops the redone record once and, dropout included
    (the RNG state is restored), ends with the uninterrupted run's numbers."""
    reference = train(small(dropout), tmp_path / "ref", progress=False)

    def kill_at_8(record):
        if record["step"] == 8:
            raise _Killed

    with pytest.raises(_Killed):
        train(small(dropout), tmp_path / "run", progress=False, on_eval=kill_at_8)
    torch.manual_seed(12345)  # whatever the process did in between
    resumed = train(small(dropout), tmp_path / "run", resume=True, progress=False)

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]

    assert timeless(records_of(tmp_path / "run")) == timeless(records_of(tmp_path / "ref"))
    assert timeless([resumed]) == timeless([reference])


def test_a_checkpoint_of_a_shallower_model_is_refused_naming_what_is_missing(tmp_path):
    """Same width, one layer instead of two: every tensor fits, but blocks.1.* are missing."""
    from sandbox.io import load_checkpoint, load_model_weights, save_checkpoint

    def model(n_layers):
        config = build_config({"model": {"mixer": "h3", "d_model": 16, "n_layers": n_layers}})
        return LanguageModel(config.model, vocab_size=10, max_seq_len=22)

    save_checkpoint(tmp_path / "one.safetensors", model(1))
    state = load_checkpoint(tmp_path / "one.safetensors")["model"]
    with pytest.raises(ValueError, match=r"does not match the model: missing \['blocks\.1\."):
        load_model_weights(model(2), state)
    load_model_weights(model(1), state)  # the tied head is no missing weight


def test_train_leaves_the_thread_count_as_it_found_it(tmp_path, monkeypatch):
    """A run's `threads` lasts for that run: the next run in the process (compare --workers 1,
    a sweep, a notebook) with `threads: null` trains with the process's default, not with the
    count the last run set (a thread count changes CPU numbers)."""
    import sandbox.train as trainer

    before = torch.get_num_threads()
    train(small(), tmp_path / "a", progress=False)  # threads: 1
    assert torch.get_num_threads() == before
    seen, real = [], trainer.evaluate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", spy)
    monkeypatch.setattr(trainer, "_DEFAULT_THREADS", 2)
    torch.set_num_threads(1)
    try:
        data = small().model_dump(mode="json")
        data["threads"] = None
        train(build_config(data), tmp_path / "b", progress=False)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {2}
    assert json.loads((tmp_path / "b" / "result.json").read_text())["threads"] == 2


def test_a_diverged_run_stops_and_says_so(tmp_path, capsys):
    """lr 1e30 without clipping: the first non-finite training loss ends the run there, its
    record has null losses (NaN is no JSON), result.json names the step, and `sandbox train`
    exits 1 with one line on stderr."""
    out = tmp_path / "r"
    argv = ["train", "configs/h3_ar.yaml", "--out", str(out), "--quiet", "train.lr=1e30",
            "train.ssm_lr=1e30", "train.grad_clip=null", "train.max_steps=6", "train.eval_every=2",
            "task.num_train=64", "task.num_valid=32", "task.num_test=32"]  # fmt: skip
    assert main(argv) == 1
    assert "the run diverged" in capsys.readouterr().err
    records = records_of(out)
    result = json.loads((out / "result.json").read_text())
    assert result["diverged_at"] == records[-1]["step"] < 6
    assert records[-1]["train_loss"] is None
