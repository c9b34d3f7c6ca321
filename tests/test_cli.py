"""The `sandbox` command line as a new user meets it: empty and unreadable files, a closed
pipe, usage errors, out of memory, --resume messages and the compare help."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import TINY as TRAIN_TINY

import sandbox.config
import sandbox.train
from sandbox.cli import main
from sandbox.config import preset_names

REPO = Path(__file__).resolve().parents[1]

# test_train's tiny run cut to two optimizer steps (about a second).
TINY = {
    **TRAIN_TINY,
    "task": {**TRAIN_TINY["task"], "num_train": 64, "num_valid": 32, "num_test": 32},
    "train": {**TRAIN_TINY["train"], "epochs": 1, "eval_every": 2},
}


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "{f}", "--out", "{out}", "--quiet"],
        ["params", "{f}"],
        ["pretrain", "{f}", "--out", "{out}", "--quiet"],
        ["compare", "--preset", "{f}", "--out", "{out}", "--quiet"],
        ["sweep", "{f}", "--out", "{out}"],
        ["pretrain", "{base}", "--out", "{out}", "--quiet"],  # an empty base file
    ],
)
def test_an_empty_config_file_is_an_error_naming_it(tmp_path, capsys, argv):
    """Was read as {}: train ran every default (~40 minutes), params exited 0."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# to do\n\n")
    base = tmp_path / "child.yaml"
    base.write_text("base: empty.yaml\ntrain: {max_steps: 1}\n")
    out = tmp_path / "out"
    argv = [a.format(f=empty, out=out, base=base) for a in argv]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.startswith("sandbox: error: ") and f"{empty.name}' is empty" in err, err
    assert not out.exists()


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "utf16.yaml"
    path.write_text("train: {epochs: 1}\n", encoding="utf-16")
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = _one_line(capsys)
    assert err == f"sandbox: error: config file '{path}' is not UTF-8 text (byte 0xff at offset 0)"


@pytest.mark.parametrize("command", ["train", "params", "pretrain"])
def test_missing_config_names_only_what_is_required(capsys, command):
    """Was "the following arguments are required: config, overrides"; overrides are optional."""
    with pytest.raises(SystemExit) as e:
        main([command])
    assert e.value.code == 2
    assert _one_line(capsys) == "sandbox: error: the following arguments are required: config"


def _closed_pipe_run(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI writing into a pipe whose reader is gone, as in `sandbox ... | head -1`."""
    read, write = os.pipe()
    os.close(read)
    try:
        cmd = [sys.executable, "-m", "sandbox.cli", *args]
        return subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


def test_a_closed_pipe_exits_quietly(tiny):
    """Was a BrokenPipeError traceback and exit 1. (Every command prints through main(), which
    handles it; --help was quiet already: argparse ignores errors writing it.)"""
    proc = _closed_pipe_run(["params", str(tiny)])
    assert proc.stderr == "" and proc.returncode == 141  # 128 + SIGPIPE, as `cat` gives


CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 1999999960000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    "error, size",
    [
        (RuntimeError(CPU_OOM), "1999999960000 bytes"),
        (torch.OutOfMemoryError(CUDA_OOM), "2.00 GiB"),
        (MemoryError(), None),
    ],
)
@pytest.mark.parametrize("command", ["train", "params"])
def test_out_of_memory_is_one_line(tmp_path, tiny, capsys, monkeypatch, error, size, command):
    def build_task(config):
        raise error

    monkeypatch.setattr(sandbox.train, "build_task", build_task)
    out = tmp_path / "out"
    argv = [command, str(tiny)] + (["--out", str(out), "--quiet"] if command == "train" else [])
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.startswith(f"sandbox: error: out of memory in `sandbox {command}`")
    assert (f"(tried to allocate {size})" in err) == (size is not None)
    assert "try smaller sizes" in err and not out.exists()


def test_other_runtime_errors_keep_their_traceback(tiny, monkeypatch):
    def build_task(config):
        raise RuntimeError("a bug: shapes (2, 3) and (4, 5) do not match")

    monkeypatch.setattr(sandbox.train, "build_task", build_task)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["params", str(tiny)])


def test_a_real_allocation_failure_under_a_memory_limit(tmp_path, tiny):
    """The reported case: a task of 10^8 tokens per example under `ulimit -v 6000000`."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6_000_000 * 1024, 6_000_000 * 1024))

    cmd = [sys.executable, "-m", "sandbox.cli", "train", str(tiny)]
    cmd += ["task.params.seq_len=100000000", "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sandbox: error: out of memory in `sandbox train` (tried to")
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--trials", "-1"), ("--jobs", "0"), ("--heartbeat", "0")])
def test_sweep_names_the_flag_below_1(tmp_path, capsys, flag, value):
    """Was "--trials, --jobs and --heartbeat must be >= 1" whichever it was."""
    space = str(REPO / "sweeps" / "smoke.yaml")
    assert main(["sweep", space, flag, value, "--out", str(tmp_path / "out")]) == 2
    assert _one_line(capsys) == f"sandbox: error: {flag} must be >= 1, got {value}"
    assert not (tmp_path / "out").exists()


def test_resume_names_the_fields_that_differ(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(run), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    flags = ["--out", str(run), "--resume", "--quiet"]
    resume = ["train", str(tiny), *flags]
    assert main(["train", str(tiny), "train.lr=0.01", *flags]) == 2
    assert _one_line(capsys) == (
        f"sandbox: error: --resume: the config differs from the one saved in {run}/config.yaml: "
        "train.lr: saved 0.003, now 0.01"
    )
    more = ["seed=4", "model.d_model=32", "model.mixer_params.head_dim=8", "train.lr=0.01"]
    assert main(["train", str(tiny), *more, *flags]) == 2
    assert _one_line(capsys).endswith(
        ": seed: saved 3, now 4; model.d_model: saved 16, now 32; "
        "train.lr: saved 0.003, now 0.01 (and 1 more)"
    )
    assert main(["train", str(tiny), "model.mixer_params.head_dim=8", *flags]) == 2
    assert _one_line(capsys).endswith(": model.mixer_params.head_dim: saved (unset), now 8")
    (run / "config.yaml").write_text("[not, a, config]\n")
    before["config.yaml"] = (run / "config.yaml").read_bytes()
    assert main(resume) == 2
    assert "is not a readable config of this command" in _one_line(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_with_nothing_to_resume_warns_and_starts_fresh(tmp_path, tiny, capsys):
    """Job scripts pass --resume on every attempt: not an error, but a mistyped --out must
    not silently start over."""
    run = tmp_path / "run"
    flags = ["--out", str(run), "--resume", "--quiet"]
    resume = ["train", str(tiny), *flags]
    assert main(resume) == 0  # no directory at all
    warning = (
        f"sandbox: warning: --resume: nothing to resume in {run} (no checkpoint.safetensors); "
        "starting from step 0"
    )
    assert capsys.readouterr().err.strip() == warning
    assert (run / "result.json").exists()
    assert main(resume) == 0  # finished: nothing is redone, nothing to warn about
    assert capsys.readouterr().err == ""
    (run / "result.json").unlink()  # killed after its last checkpoint: it resumes
    assert main(resume) == 0
    assert capsys.readouterr().err == ""
    for name in ("result.json", "checkpoint.safetensors"):  # killed before the first one
        (run / name).unlink()
    assert main(resume) == 0
    assert capsys.readouterr().err.strip() == warning
    (run / "result.json").unlink()
    (run / "checkpoint.safetensors").unlink()
    assert main(["train", str(tiny), "train.lr=0.01", *flags]) == 2  # the refusal comes alone
    assert "the config differs" in _one_line(capsys)


def test_pretrain_with_nothing_to_resume_warns_too(tmp_path, capsys):
    data = tmp_path / "data"
    prepare = ["prepare-data", "--tiny-corpus", "--tokenizer", "bytes", "--workers", "1"]
    assert main([*prepare, "--out", str(data), "--quiet"]) == 0
    config = tmp_path / "pt.yaml"
    train = {"global_batch_tokens": 64, "micro_batch_size": 2, "max_steps": 2, "eval_every": 2}
    train |= {"eval_tokens": 64, "checkpoint_every": 1, "log_every": 1}
    model = {"mixer": "h3", "mixer_params": {"d_state": 8}, "d_model": 16, "n_layers": 1}
    data_section = {"dir": str(data), "tokenizer": "bytes", "seq_len": 32}
    pretrain = {"device": "cpu", "threads": 1, "data": data_section, "model": model}
    config.write_text(yaml.safe_dump({**pretrain, "train": train}))
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["pretrain", str(config), "--out", str(run), "--resume", "--quiet"]) == 0
    assert f"nothing to resume in {run}" in _one_line(capsys)
    assert (run / "result.json").exists()
    assert main(["pretrain", str(config), "--out", str(run), "--resume", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_compare_help_lists_the_presets_and_the_default(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default h3-table2)" in text and "h3-table2" in preset_names()
    assert f"configs/compare/ ({', '.join(preset_names())})" in text
    # From the files, not a list in the code: a new preset file shows up.
    for name in ("a-new-preset", "h3-table2"):
        (tmp_path / f"{name}.yaml").write_text("tasks: {}\n")
    monkeypatch.setattr(sandbox.config, "PRESET_DIR", tmp_path)
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "configs/compare/ (a-new-preset, h3-table2)" in capsys.readouterr().out


def test_overrides_after_the_flags(tmp_path, tiny, capsys):
    """Overrides may come after --out and the other flags (argparse refused them there)."""
    run = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(run), "--quiet", "train.lr=0.01"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.01
    for argv in (
        ["train", str(tiny), "--out", str(run), "--bogus"],
        ["train", str(tiny), "--out", str(run), "train.lr=0.01", "--bogus"],
        ["sweep-report", "--out", str(tmp_path / "d"), "a.b=1"],  # takes no overrides
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert _one_line(capsys).startswith("sandbox: error: unrecognized arguments: ")
    assert not (tmp_path / "d").exists()


def test_a_run_directory_has_one_writer(tmp_path, tiny, capsys):
    """Two processes resuming into one --out (a job submitted twice) both trained and wrote
    every step twice into metrics.jsonl. A held directory is refused at once, nothing written;
    the prepare-data lock is the same one (sandbox.io.lock_dir)."""
    from sandbox.io import lock_dir

    out = tmp_path / "run"
    with lock_dir(out):  # another holder: flock locks conflict between open files too
        assert main(["train", str(tiny), "--out", str(out), "--quiet"]) == 2
        assert "another process is writing there" in _one_line(capsys)
        assert list(out.iterdir()) == []
    assert main(["train", str(tiny), "--out", str(out), "--quiet"]) == 0
    assert (out / "result.json").exists()


def test_unwritable_out_and_damaged_result_are_one_line_errors(tmp_path, tiny, capsys, monkeypatch):
    """An existing --out that cannot be written was a PermissionError traceback at the first
    write; a damaged result.json of a finished run was a bare JSON error, or returned as the
    run's result when it held a list."""
    import sandbox.io

    out = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    for damaged, why in (('{"test_', "is not valid JSON"), ("[1, 2]", "holds no JSON object")):
        (out / "result.json").write_text(damaged)
        assert main(["train", str(tiny), "--out", str(out), "--quiet", "--resume"]) == 2
        assert f"{out / 'result.json'} {why}" in _one_line(capsys)
    # Root may write anywhere, so the unwritable directory is simulated where it is asked.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(sandbox.io.os, "access", lambda p, m: p != locked and real_access(p, m))
    assert main(["train", str(tiny), "--out", str(locked), "--quiet"]) == 2
    assert "the directory is not writable" in _one_line(capsys)
    assert list(locked.iterdir()) == []


def test_a_run_directory_lock_can_be_waited_for(tmp_path, capsys):
    """lock_dir(wait_s): a sweep's retry of a stale trial waits for the stalled worker to let
    go of the run directory (it erred at once, and three such errors stopped the sweep)."""
    import threading
    import time

    from sandbox.io import lock_dir

    out = tmp_path / "run"
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock_dir(out):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    held.wait()
    timer = threading.Timer(1.0, release.set)
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match="another process is writing there"):
            with lock_dir(out, wait_s=0.3):
                pass
        assert time.monotonic() - start >= 0.3
        assert "waiting up to 0 s" in capsys.readouterr().err  # told once, rounded
        timer.start()
        with lock_dir(out, wait_s=30):  # taken once the holder lets go
            assert release.is_set()
    finally:
        timer.cancel()
        release.set()
        thread.join()
    assert "another process is writing there; waiting up to 30 s" in capsys.readouterr().err


def test_a_refused_lock_leaves_the_holders_new_directory(tmp_path, monkeypatch):
    """Two writers find a new --out missing and both make it; the first to lock it holds it.
    The refused one must not remove it: the holder's directory came back unlocked, and a third
    writer then got the lock beside it. Here "another process" locks it right after make_dir."""
    import fcntl

    from sandbox import io

    run, holder, real = tmp_path / "run", {}, io.make_dir

    def make_dir_then_another_process_locks(path):
        real(path)
        holder["fd"] = fd = os.open(path, os.O_RDONLY)  # its own open(): its own flock
        fcntl.flock(fd, fcntl.LOCK_EX)

    monkeypatch.setattr(io, "make_dir", make_dir_then_another_process_locks)
    try:
        with pytest.raises(ValueError, match="another process is writing there"):
            with io.lock_dir(run):
                pass
        assert run.is_dir(), "the refused writer removed the holder's directory"
        monkeypatch.setattr(io, "make_dir", real)
        with pytest.raises(ValueError, match="another process is writing there"):
            with io.lock_dir(run):  # a third writer is still kept out
                pass
    finally:
        os.close(holder["fd"])


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "configs/h3_ar.yaml", "--out", ""],
        ["compare", "--out", " "],
        ["prepare-data", "--tiny-corpus", "--tokenizer", "bytes", "--out", ""],
        ["sweep", "sweeps/smoke.yaml", "--storage", ""],
        ["sweep-report", "--study", ""],
    ],
)
def test_an_empty_path_option_is_refused(argv, tmp_path, monkeypatch, capsys):
    """An unset "$OUT" in a script: prepare-data wrote into the cwd, the others silently used
    their default directory or storage."""
    repo = Path(__file__).resolve().parents[1]
    argv = [a if not a.endswith((".yaml",)) else str(repo / a) for a in argv]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "empty value" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_prepare_data_names_an_existing_input_that_is_no_regular_file(tmp_path, capsys):
    argv = ["prepare-data", "/dev/null", "--out", str(tmp_path / "o"), "--tokenizer", "bytes",
            "--quiet", "--workers", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a regular file" in err and "not found" not in err


def test_generate_names_a_prompt_that_is_not_utf8(monkeypatch, capsys):
    import sandbox.generate as generate
    from sandbox.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("bytes")
    monkeypatch.setattr(generate, "load_for_generation", lambda ckpt, cfg: (None, tokenizer))
    assert main(["generate", "x", "--prompt", "ok\udcff"]) == 2  # a non-UTF-8 byte in argv
    assert "--prompt is not valid UTF-8" in capsys.readouterr().err
