"""Pretraining on CPU: configs and presets, `sandbox params`, the gpt2 init, data checks, loss
going down, 2-process DDP/FSDP equal to one process, kill-and-resume equal to one run."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml
import zstandard

from sandbox.cli import main
from sandbox.config import ConfigError, ModelConfig, validate
from sandbox.data.prepare import prepare_data
from sandbox.data.tiny_corpus import TINY_CORPUS, documents
from sandbox.io import load_checkpoint
from sandbox.model import LanguageModel
from sandbox.pretrain import load_pretrained, pretrain
from sandbox.pretrain_config import PretrainConfig, load_pretrain_config, vocab_size

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))

# 8 steps of 4 sequences x 32 bytes: one process runs 2 micro-batches of 2 per step, two
# processes one each. Checkpoints every 2 steps, a log line every step, evaluations every 4 on
# 7 windows (two processes take 4 each, one of them padding). Dropout on, so that its masks
# must not depend on the number of processes or on a resume either.
SMALL = {
    "seed": 1,
    "device": "cpu",
    "threads": 1,
    "data": {"tokenizer": "bytes", "seq_len": 32},
    "model": {
        "mixer": "h3",
        "mixer_params": {"d_state": 8},
        "d_model": 32,
        "n_layers": 2,
        "attn_layers": [1],
        "attn_params": {"num_heads": 2},
        "init": "gpt2",
        "dropout": 0.1,
    },
    "train": {
        "lr": 3.0e-3,
        "global_batch_tokens": 128,
        "micro_batch_size": 2,
        "max_steps": 8,
        "eval_every": 4,
        "eval_tokens": 224,
        "checkpoint_every": 2,
        "log_every": 1,
        "peak_tflops": 1.0,
    },
}
CURVE = ("step", "tokens", "lr", "train_loss", "val_loss", "val_ppl")  # not the timings


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """150 tiny-corpus documents, byte-tokenized, 10% val."""
    root = tmp_path_factory.mktemp("pretrain_data")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(150)))
    out = root / "bytes"
    prepare_data([str(src)], out, tokenizer="bytes", val_fraction=0.1, workers=1, progress=False)
    return out


def small(data_dir, **train) -> PretrainConfig:
    data = json.loads(json.dumps(SMALL))
    data["data"]["dir"] = str(data_dir)
    data["train"].update(train)
    return PretrainConfig.model_validate(data)


def curve(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: r.get(k) for k in CURVE} for r in map(json.loads, lines)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One uninterrupted single-process run of SMALL."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = pretrain(small(data_dir), out, progress=False)
    return out, result


def test_loss_decreases_and_run_dir(reference, data_dir):
    out, result = reference
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.3
    assert records[0]["train_loss"] == pytest.approx(math.log(257), abs=0.3)  # near uniform
    assert records[-1]["val_loss"] < records[3]["val_loss"]
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    assert result["steps"] == 8 and result["tokens"] == 8 * 128
    from sandbox.train import lr_factor  # checked against hand values in test_train

    cfg = small(data_dir).train
    assert [r["lr"] for r in records] == pytest.approx(
        [cfg.lr * lr_factor(r["step"] - 1, 8, cfg) for r in records]
    )
    assert result["val_loss"] == records[-1]["val_loss"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 8 and "base" not in saved
    # load_pretrained: the final weights and the tokenizer, from the directory or the file.
    model, tokenizer = load_pretrained(out)
    assert tokenizer.name == "bytes" and not model.training
    for name, t in weights(out / "model.safetensors").items():
        torch.testing.assert_close(model.state_dict()[name], t, rtol=0, atol=0)
    model2, _ = load_pretrained(out / "checkpoint.safetensors")
    torch.testing.assert_close(model2.embedding.weight, model.embedding.weight, rtol=0, atol=0)


class Killed(Exception):
    pass


def kill_at_5(step):
    if step == 5:  # checkpoint at 4; the log line of step 5 is already written
        raise Killed


def test_kill_and_resume_continues_exactly(reference, data_dir, tmp_path):
    ref_out, ref_result = reference
    out = tmp_path / "run"
    with pytest.raises(Killed):
        pretrain(small(data_dir), out, progress=False, on_step=kill_at_5)
    assert len(curve(out)) == 5
    pretrain(small(data_dir), out, resume=True, progress=False)
    assert curve(out) == curve(ref_out)  # bitwise: same floats in the JSON
    for name, t in weights(ref_out / "model.safetensors").items():
        torch.testing.assert_close(weights(out / "model.safetensors")[name], t, rtol=0, atol=0)
    # Resuming a finished run returns its result; a fresh run into it is refused.
    assert pretrain(small(data_dir), out, resume=True, progress=False)["steps"] == 8
    # Killed after the final checkpoint, before the weights and result.json: the resumed run
    # trains nothing and reports the losses of the last log line.
    (out / "result.json").unlink()
    (out / "model.safetensors").unlink()
    result = pretrain(small(data_dir), out, resume=True, progress=False)
    for key in ("train_loss", "val_loss", "val_ppl"):
        assert result[key] == ref_result[key] == curve(ref_out)[-1][key]
    assert result["steps"] == 8 and curve(out) == curve(ref_out)
    for name, t in weights(ref_out / "model.safetensors").items():
        torch.testing.assert_close(weights(out / "model.safetensors")[name], t, rtol=0, atol=0)
    with pytest.raises(ValueError, match="--resume"):
        pretrain(small(data_dir), out, progress=False)


def test_resume_purges_the_tensorboard_events_it_redoes(data_dir, tmp_path, monkeypatch):
    """The events logged after the checkpoint were logged again on --resume, so TensorBoard
    drew steps 5, 6, 5, 6, 7 ...: the writer now starts with purge_step, the first step it
    logs, after which TensorBoard drops the earlier session's events (a stand-in writer:
    tensorboard is an optional package)."""
    writers = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.purge_step, self.steps = purge_step, []
            writers.append(self)

        def add_scalar(self, key, value, step):
            self.steps.append(step)

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        pretrain(small(data_dir), out, progress=False, on_step=kill_at_5)
    pretrain(small(data_dir), out, resume=True, progress=False)
    first, resumed = writers
    assert first.purge_step == 1 and sorted(set(first.steps)) == [1, 2, 3, 4, 5]
    assert resumed.purge_step == 5 == min(resumed.steps)  # checkpoint at 4, step 5 redone


def _torchrun_pretrain(args: list[str], out: Path, timeout: float) -> None:
    """``torchrun --standalone --nproc_per_node 2 -m sandbox.cli pretrain *args --out out`` (the
    README's command), asserting that it succeeds.

    One retry, only when the first failure is a worker killed by a signal: with Gloo on CPU,
    about 1 launch in 100 (2 of 171 on the 2-core dev machine, and once in CI) had a worker die
    in torch's C++ (SIGSEGV, or SIGABRT: "terminate called without an active exception") with
    no Python error, so no code of ours raised it. An error of ours exits 1 and fails at once,
    as does a second crash.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    resume = "--resume" in args
    for attempt in (1, 2):
        proc = subprocess.Popen(
            [*cmd, "-m", "sandbox.cli", "pretrain", *args, "--quiet", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # its own process group: a hang kills launcher and workers
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"torchrun did not finish in {timeout} s")
        if proc.returncode == 0:
            return
        # torchrun's summary names the first worker to fail under "Root Cause"; a negative
        # exit code there is the signal that killed it.
        root = err.rpartition("Root Cause")[2]
        if attempt == 2 or not re.search(r"exitcode\s*:\s*-\d+", root):
            break
        warnings.warn(f"torchrun worker killed by a signal, retrying: {root[-600:]}", stacklevel=2)
        if not resume:  # a fresh run refuses a used directory; a resume goes on from it
            shutil.rmtree(out, ignore_errors=True)
    pytest.fail(f"torchrun failed (exit {proc.returncode}): {err[-3000:]}")


@pytest.mark.timeout(500)  # two launches of at most 120 s, each retried at most once
def test_two_processes_match_one(reference, data_dir, tmp_path):
    """torchrun with 2 processes against one process:
    - DDP, 1 micro-batch each, resuming a one-process run (2 micro-batches) killed after step 5:
      a checkpoint carries over to another world size;
    - FSDP2 at twice the batch, 2 micro-batches each (the gradient sync skipped in the first)
      against one process x 4."""
    ref_out, _ = reference
    big = small(data_dir, global_batch_tokens=256)
    pretrain(big, tmp_path / "ref_big", progress=False)
    configs = {"ddp": small(data_dir), "fsdp": big}
    for run, config in configs.items():
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with pytest.raises(Killed):
        pretrain(small(data_dir), tmp_path / "ddp", progress=False, on_step=kill_at_5)
    _torchrun_pretrain([str(tmp_path / "ddp.yaml"), "--resume"], tmp_path / "ddp", timeout=120)
    fsdp_args = [str(tmp_path / "fsdp.yaml"), "train.fsdp=true"]
    _torchrun_pretrain(fsdp_args, tmp_path / "fsdp", timeout=120)
    assert json.loads((tmp_path / "ddp" / "result.json").read_text())["processes"] == 2
    for run, ref in (("ddp", ref_out), ("fsdp", tmp_path / "ref_big")):
        ref_curve, ref_weights = curve(ref), weights(ref / "model.safetensors")
        got = curve(tmp_path / run)
        assert [r["step"] for r in got] == [r["step"] for r in ref_curve]
        for a, b in zip(got, ref_curve):
            for key in ("train_loss", "val_loss", "lr"):
                assert (a[key] is None) == (b[key] is None)
                if a[key] is not None:
                    assert a[key] == pytest.approx(b[key], rel=1e-5), (run, a["step"], key)
        w = weights(tmp_path / run / "model.safetensors")
        assert w.keys() == ref_weights.keys()
        for name, t in ref_weights.items():
            torch.testing.assert_close(w[name], t, rtol=1e-4, atol=1e-5)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sandbox: error:"), err
    return err


def test_bad_data_exit_2_and_write_nothing(data_dir, tmp_path, capsys):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(small(data_dir).model_dump(mode="json")))
    out = tmp_path / "run"
    base = ["pretrain", str(config), "--out", str(out), "--quiet"]
    no_index = tmp_path / "half"
    no_index.mkdir()
    cases = {
        f"data.dir={tmp_path / 'missing'}": "does not exist",
        f"data.dir={no_index}": "no index.json",
        f"data.dir={data_dir / 'train.bin'}": "is not a directory",
        "data.tokenizer=gpt2": "prepared with 'bytes'",
        "train.global_batch_tokens=100": "train.global_batch_tokens",
        "train.log_every=3": "multiple of train.log_every",
        "train.bogus=1": "unknown key",
        "train.betas=[1.5,0.9]": "train.betas.0",
        "train.eval_tokens=10": "train.eval_tokens (10) must be at least data.seq_len",
    }
    for override, message in cases.items():
        assert message in _error(capsys, [*base[:2], override, *base[2:]])
        assert not out.exists()
    # Ids the model cannot embed: an index promising more than the vocab, or a stray id.
    bad = tmp_path / "bad"
    bad.mkdir()
    index = json.loads((data_dir / "index.json").read_text())
    index["tokenizer"]["vocab_size"] = 300
    (bad / "index.json").write_text(json.dumps(index))
    assert "do not fit" in _error(capsys, [*base[:2], f"data.dir={bad}", *base[2:]])
    index["tokenizer"]["vocab_size"] = 257
    (bad / "index.json").write_text(json.dumps(index))
    (bad / "val.bin").write_bytes((data_dir / "val.bin").read_bytes())
    # id 260: inside the model's padded vocabulary (264), which passed it, but past the bytes
    # tokenizer's 257, so corruption.
    (bad / "train.bin").write_bytes(bytes([0x04, 0x01]) * 1000)
    # A token file that is not the one index.json counted (appended to or cut since).
    assert "train.bin holds 1000 tokens, index.json says" in _error(
        capsys, [*base[:2], f"data.dir={bad}", *base[2:]]
    )
    index["splits"]["train"]["tokens"] = 1000
    (bad / "index.json").write_text(json.dumps(index))
    assert "token id 260 is past the bytes tokenizer's vocabulary of 257" in _error(
        capsys, [*base[:2], f"data.dir={bad}", *base[2:]]
    )
    # A missing split file or a foreign index.json (the vocabulary check above ran in training,
    # so it made ``out``: these use another one).
    base[3] = str(tmp_path / "run2")
    (bad / "val.bin").unlink()
    assert "the val split's val.bin is missing" in _error(
        capsys, [*base[:2], f"data.dir={bad}", *base[2:]]
    )
    bad_vocab = json.loads((data_dir / "index.json").read_text())
    bad_vocab["tokenizer"]["vocab_size"] = "many"
    float_vocab = json.loads((data_dir / "index.json").read_text())
    float_vocab["tokenizer"]["vocab_size"] += 0.5  # was truncated to the true size, and passed
    broken_indexes = (json.dumps(bad_vocab), json.dumps(float_vocab))
    for broken in ('{"format": 1}', "[1, 2]", "{not json", *broken_indexes):
        (bad / "index.json").write_text(broken)
        assert "index.json is not a prepare-data index" in _error(
            capsys, [*base[:2], f"data.dir={bad}", *base[2:]]
        )
    assert not (tmp_path / "run2").exists()


def test_params_cli(capsys):
    assert main(["params", str(ROOT / "configs/pretrain/h3-125m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "126,387,456 parameters" in out
    parts = {" ".join(line.split()[:-2]): line.split()[-2] for line in out.splitlines()[1:]}
    assert set(parts) == {"embeddings", "mixer h3", "mixer attention", "mlp", "norms"}
    assert parts["embeddings"] == "38,602,752"  # 50264 x 768, the tied head not again
    assert sum(int(n.replace(",", "")) for n in parts.values()) == 126_387_456
    # Synthetic run configs too, with overrides.
    assert main(["params", str(ROOT / "configs/h3_ar.yaml"), "model.n_layers=1"]) == 0
    assert "mixer h3" in capsys.readouterr().out


def test_params_reads_a_config_as_its_command_would(tmp_path, capsys):
    """`params` told the two kinds apart by a `data` section alone: a pretraining config
    without one was refused (train.max_tokens "unknown"), and a run config naming a base file
    passed, where `sandbox train` refuses it."""
    model = {"mixer": "h3", "d_model": 16, "n_layers": 1, "mixer_params": {"d_state": 8}}
    no_data = tmp_path / "p.yaml"
    no_data.write_text(yaml.safe_dump({"model": model, "train": {"max_tokens": 4096}}))
    assert main(["params", str(no_data)]) == 0
    assert load_pretrain_config(no_data).train.max_tokens == 4096  # what pretrain reads
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": model}))
    child = tmp_path / "child.yaml"
    child.write_text("base: run.yaml\ntask: {num_train: 64}\n")
    assert main(["params", str(child)]) == 2
    assert main(["train", str(child), "--out", str(tmp_path / "out")]) == 2
    capsys.readouterr()
    # Keys both kinds have, only: it was counted as a run config (vocab 10, where pretraining
    # would build GPT-2's 50264); a task section or a run-only train key decides.
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"model": model, "train": {"max_steps": 10}}))
    assert main(["params", str(both)]) == 2
    assert "reads as a run config and as a pretraining config" in capsys.readouterr().err
    for extra in ({"task": {"name": "associative_recall"}}, {"train": {"epochs": 2}}):
        both.write_text(yaml.safe_dump({"model": model, **extra}))
        assert main(["params", str(both)]) == 0
        assert "vocab 10)" in capsys.readouterr().out


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_build_on_meta(path):
    config = load_pretrain_config(path)
    with torch.device("meta"):
        model = LanguageModel(config.model, vocab_size(config.data), config.data.seq_len)
    assert model.num_params() > 0
    if path.stem.startswith(("h3-", "gpt-")):
        assert config.model.init == "gpt2" and vocab_size(config.data) == 50264
        assert config.data.seq_len == 2048 and config.train.max_tokens
        assert config.model.pos_emb == path.stem.startswith("gpt-")


def test_graduation_and_base_files(tmp_path):
    """A synthetic run config's model section drops into a pretrain config as is."""
    run = yaml.safe_load((ROOT / "configs/h3_ar.yaml").read_text())
    (tmp_path / "grad.yaml").write_text(
        yaml.safe_dump({"base": str(ROOT / "configs/pretrain/pile.yaml"), "model": run["model"]})
    )
    config = load_pretrain_config(tmp_path / "grad.yaml", ["train.max_steps=10"])
    assert config.model == ModelConfig.model_validate(run["model"])
    assert config.train.lr == 6e-4 and config.train.max_steps == 10
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_pretrain_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="max_steps or train.max_tokens"):
        validate(PretrainConfig, {})


def _std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def test_gpt2_init_std_and_default_unchanged():
    cfg = {"d_model": 128, "n_layers": 4, "attn_layers": [1], "mixer_params": {"d_state": 8}}
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(init="gpt2", **cfg), vocab_size=1000, max_seq_len=16)
    torch.manual_seed(0)
    default = LanguageModel(ModelConfig(**cfg), vocab_size=1000, max_seq_len=16)
    residual = 0.02 / math.sqrt(2 * 4)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            expected = residual if name.endswith(("out_proj", "fc2")) else 0.02
            assert _std(module.weight) == pytest.approx(expected, rel=0.1), name
            if getattr(module, "bias", None) is not None:
                assert not module.bias.any(), name
    assert _std(model.blocks[0].mixer.q_proj.weight) == pytest.approx(0.02, rel=0.1)
    # The default keeps PyTorch's init of the mixer projections (uniform, std 1/sqrt(3 * 128)).
    assert _std(default.blocks[0].mixer.q_proj.weight) == pytest.approx(1 / 384**0.5, rel=0.1)
    # SSM parameters (and every other non-Linear parameter) keep their own init.
    gpt2_params, default_params = dict(model.named_parameters()), dict(default.named_parameters())
    ssm = [n for n in gpt2_params if ".k_ssm." in n or ".kv_ssm." in n]
    assert ssm
    for name in ssm:
        torch.testing.assert_close(gpt2_params[name], default_params[name], rtol=0, atol=0)


def test_tiny_corpus_is_reproducible_and_wired(tmp_path, monkeypatch, capsys):
    raw = zstandard.ZstdDecompressor().stream_reader(TINY_CORPUS.open("rb")).read()
    assert 300_000 < len(raw) < 2_500_000
    assert [json.loads(line)["text"] for line in raw.decode().splitlines()] == documents()
    seen = {}

    def fake_prepare(inputs, out, **kw):
        seen["inputs"] = inputs
        return {"splits": {}, "malformed": {"count": 0}}

    monkeypatch.setattr("sandbox.data.prepare.prepare_data", fake_prepare)
    assert main(["prepare-data", "--tiny-corpus", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen["inputs"] == [str(TINY_CORPUS)]
    assert "--tiny-corpus" in _error(capsys, ["prepare-data", "--out", str(tmp_path)])


def test_pretrain_windows_start_anywhere_a_whole_window_fits():
    """40 tokens, windows of seq_len + 1 = 33: every start 0..7 is drawn, the last included."""
    from sandbox.pretrain import train_starts

    starts = {int(s) for step in range(20) for s in train_starts(0, step, 40, 32, 50)}
    assert starts == set(range(8))


def test_a_diverged_pretraining_run_stops_with_one_line(data_dir, tmp_path):
    """lr 1e30 without clipping: the logged training loss is not finite, and the run stops
    there with a ValueError (exit 2 from the CLI) instead of stepping on NaN weights to the
    end; no checkpoint of those weights and no result is written."""
    out = tmp_path / "run"
    config = small(data_dir, lr=1e30, ssm_lr=1e30, grad_clip=None)
    with pytest.raises(ValueError, match="training loss is nan .* the run diverged"):
        pretrain(config, out, progress=False)
    assert not (out / "result.json").exists() and not (out / "checkpoint.safetensors").exists()
