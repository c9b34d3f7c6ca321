"""benchmarks.gpu's step runner, exercised with CPU steps: a step's output goes to its log and
its JSON where asked, and a failing step is reported by its exit status, not raised. And
benchmarks.triton_resources' --plan entries: parsed into the kernels' Plan, or rejected. And
the round-robin timer's repeat count, and layer_speed's two forms of multi-head H3."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu
from sandbox.compare import load_preset


def test_gpu_steps_report_status_and_keep_output(monkeypatch, tmp_path):
    tiny = ["--max-len", "64", "--repeats", "1", "--width", "64"]
    monkeypatch.setitem(gpu.STEPS, "tiny", ("benchmarks.layer_speed", tiny, "t.json"))
    no_gpu = ["--device", "cuda"]
    monkeypatch.setitem(gpu.STEPS, "nogpu", ("benchmarks.layer_speed", no_gpu, "x.json"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the step's process sees no GPU, if any
    status, _ = gpu.run_step("tiny", tmp_path)
    assert status == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["L"] for r in rows] == [64]  # the step's own arguments reached it
    assert "attention" in (tmp_path / "tiny.log").read_text()  # its table, teed to the log
    status, _ = gpu.run_step("nogpu", tmp_path)
    assert status == 2
    assert "no CUDA device" in (tmp_path / "nogpu.log").read_text()
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "entry",
    [
        "2048:32,64,32,32",  # too few values
        "2048:32,64,32,32,4,3",  # rows not a power of two
        "2048:32,32,32,32,4",  # n1 * n2 != N
        "2048:32,64,24,32,4",  # S does not divide n1
        "3000:32,64,32,32,4",  # not a fused size
        "2048:32,64,x,32,4",
        "2048:32,64,32,32,8",  # 8 warps with n2 = 64: crashed an H100, refused by fft_triton
    ],
)
def test_triton_resources_rejects_a_bad_plan(entry, capsys):
    """A malformed --plan is one argparse error line naming the entry, exit 2, nothing
    compiled."""
    triton_resources = pytest.importorskip("benchmarks.triton_resources")
    with pytest.raises(SystemExit) as exit_info:
        triton_resources.main(["--plan", entry, "--out", "/nonexistent/never-written.json"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--plan" in err and repr(entry) in err


def test_triton_resources_reads_a_plan():
    """A well-formed entry gives its size and plan; the plan builds the kernels' Plan with
    its rows."""
    triton_resources = pytest.importorskip("benchmarks.triton_resources")
    from kernels import fft_triton

    n, spec = triton_resources.plan_spec("2048:32,64,32,32,4,2")
    assert (n, spec) == (2048, (32, 64, 32, 32, 4, 2))
    p = fft_triton.plan(n, torch.bfloat16, spec)
    assert (p.n1, p.n2, p.S, p.C, p.warps, p.rows, p.stream) == (32, 64, 32, 32, 4, 2, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the arguments up to the GPU")
def test_gpu_triton_steps_parse_and_split_the_accuracy_cases(capsys):
    """benchmarks.gpu's triton steps: their arguments parse (triton_gpu stops at its no-CUDA
    check, after argparse), and the accuracy parts run every case of ACCURACY once, in order.
    And importing benchmarks.gpu does not import triton (run in a fresh process): this file
    imports it while pytest collects, before the interpreted kernel tests set
    TRITON_INTERPRET=1, and triton then started its GPU runtime (every such test failed)."""
    code = "import sys, benchmarks.gpu; print('triton' in sys.modules)"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert fresh.stdout.strip() == "False", fresh.stderr
    triton_gpu = pytest.importorskip("benchmarks.triton_gpu")
    cases = []
    for name, (module, argv, _) in gpu.STEPS.items():
        if module != "benchmarks.triton_gpu":
            continue
        with pytest.raises(SystemExit) as exit_info:
            triton_gpu.main([*argv, "--out", "/nonexistent/never-written.json"])
        assert exit_info.value.code == 2
        assert "needs a CUDA device" in capsys.readouterr().err, name
        if "--part" in argv:
            part = triton_gpu.part_spec(argv[argv.index("--part") + 1])
            cases += triton_gpu.part_of(triton_gpu.ACCURACY, *part)
            assert len(cases) > 0
    assert cases == triton_gpu.ACCURACY


def test_triton_gpu_variants_are_plans_the_kernels_accept(capsys):
    """Every tuning variant of benchmarks.triton_gpu is a plan fft_triton.plan takes for its
    size (n = 2L): one it refuses, or that crashes the device, would end a GPU session's run.
    An L past the fused kernel's capacity is an argparse error before anything runs (it raised
    after the torch and SDPA rows)."""
    triton_gpu = pytest.importorskip("benchmarks.triton_gpu")
    from kernels import fft_triton

    for L, specs in triton_gpu.VARIANTS.items():
        for spec in specs:
            entry = tuple(int(v) for v in spec.removesuffix("+bwd").split(","))
            p = fft_triton.plan(2 * L, torch.bfloat16, entry)
            assert p.n1 * p.n2 == 2 * L and p.n1 % p.S == p.n1 % p.C == 0
    with pytest.raises(SystemExit) as exit_info:
        triton_gpu.main(["--lengths", "16384", "--out", "/nonexistent/never-written.json"])
    assert exit_info.value.code == 2
    assert "expected an L in 1 .. 8192, got '16384'" in capsys.readouterr().err


def test_state_passing_benchmark_compares_both_paths(tmp_path, capsys):
    """benchmarks.state_passing: the full convolution and every chunk size shorter than L
    side by side, with their ratio to the full path; a chunk of 0 exits 2 with one line and
    writes nothing."""
    from benchmarks import state_passing

    out = tmp_path / "sp.json"
    args = ["--lengths", "64", "--chunks", "16", "100", "--channels", "4", "--repeats", "1"]
    state_passing.main([*args, "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["L"], r["impl"]) for r in rows] == [(64, "full"), (64, "T=16")]  # 100 >= L
    assert all(r["median_ms"] > 0 for r in rows)
    # One round: the paired ratio is the ratio of the two calls' times, printed as T / full.
    full, chunked = rows
    assert chunked["speedup"] == pytest.approx(full["median_ms"] / chunked["median_ms"])
    assert f"{chunked['median_ms'] / full['median_ms']:.2f}x" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    with pytest.raises(SystemExit) as e:
        state_passing.main(["--chunks", "0", "--out", str(bad)])
    assert e.value.code == 2 and not bad.exists()
    assert "chunks" in capsys.readouterr().err.strip().splitlines()[-1]


def test_layer_speed_task_shapes(tmp_path, capsys):
    """benchmarks.layer_speed --task-shapes: every mixer of the h3-table2 preset, built as the
    preset builds it (multi-head H3), at its training lengths."""
    from benchmarks import layer_speed

    out = tmp_path / "tasks.json"
    layer_speed.main(["--task-shapes", "--repeats", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert (payload["batch"], payload["width"]) == (32, 64)
    variants = load_preset("h3-table2").variants  # the mixers as the preset trains them
    want = {name: v["model"].get("mixer_params", {}) for name, v in variants.items()}
    assert payload["mixers"] == want
    assert payload["width"] == load_preset("h3-table2").base["model"]["d_model"]
    assert [r["L"] for r in payload["rows"]] == [20, 30]
    for row in payload["rows"]:
        assert all(row[n]["median_ms"] > 0 for n in ("s4d", "gss", "h3", "attention", "hyena"))
    assert "hyena" in capsys.readouterr().out


def test_round_robin_takes_more_repeats_for_short_calls():
    """--min-seconds: a round of two ~2 ms calls gets more than the 3 repeats asked for, but no
    more than fit 0.1 s (sleep never returns early), each call counted once per repeat plus
    the two warm-up calls; without it, exactly the repeats asked for."""
    import time

    from benchmarks.fftconv import time_round_robin

    calls = {"a": 0, "b": 0}

    def make(name):
        def call():
            calls[name] += 1
            time.sleep(0.002)
            return torch.zeros(())

        return call

    fns = {name: make(name) for name in calls}
    out = time_round_robin(fns, False, 3, "cpu", min_seconds=0.1)
    assert 3 < out["a"]["repeats"] == out["b"]["repeats"] <= 25
    assert calls == {"a": out["a"]["repeats"] + 2, "b": out["b"]["repeats"] + 2}
    assert out["a"]["min_ms"] >= 2.0
    assert time_round_robin(fns, False, 3, "cpu")["a"]["repeats"] == 3


def test_round_robin_varies_which_call_comes_before_which():
    """Each callable follows each of the others about as often (the order is shuffled each
    round), so none always pays for the same predecessor. A rotation of one order would have
    "a" follow "c" in 2 of 3 rounds (a b c, b c a, c a b)."""
    from collections import Counter

    from benchmarks.fftconv import time_round_robin

    sequence = []
    fns = {name: (lambda name=name: sequence.append(name) or torch.zeros(())) for name in "abc"}
    time_round_robin(fns, False, 300, "cpu")
    timed = sequence[6:]  # after the warm-up and estimate rounds
    assert Counter(timed) == {"a": 300, "b": 300, "c": 300}
    for name in "abc":
        before = Counter(p for p, x in zip(timed, timed[1:]) if x == name and p != name)
        assert set(before) == set("abc") - {name}
        assert max(before.values()) / sum(before.values()) < 0.6


def test_round_robin_speedup_pairs_calls_of_one_round(monkeypatch):
    """baseline=: the speedup is the median of per-round ratios, not a ratio of medians. On a
    fake clock, a's and b's calls take the listed ms (the first two: warm-up and the round
    estimate); the per-round ratios a / b are 0.5, 2, 0.5, 2, 0.25 (median 0.5), while the
    medians, 3 and 2 ms, would give 1.5."""
    import benchmarks.fftconv as bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    costs = {"a": [9, 9, 1, 2, 3, 4, 5], "b": [9, 9, 2, 1, 6, 2, 20]}

    def make(name):
        def call():
            clock[0] += 1e-3 * costs[name].pop(0)
            return torch.zeros(())

        return call

    out = bench.time_round_robin({n: make(n) for n in costs}, False, 5, "cpu", baseline="a")
    assert out["a"]["speedup"] == 1.0
    assert out["b"]["speedup"] == pytest.approx(0.5)
    assert (out["a"]["median_ms"], out["b"]["median_ms"]) == pytest.approx((3.0, 2.0))
    alone = bench.time_round_robin({"c": lambda: torch.zeros(())}, False, 1, "cpu")
    assert "speedup" not in alone["c"]


def test_side_by_side_table_shows_paired_speedups():
    """The "vs naive" column shows each phase's paired speedup where the row has one, and the
    ratio of medians where it was timed apart from naive (attention at long L): 1.25x and 0.50x
    from the paired ratios, though the medians alone would give 2.00x and 1.00x; 0.10x and
    0.20x from the medians of a row timed alone."""
    from rich.console import Console

    from benchmarks.fftconv import print_tables

    def row(impl, fwd, fwd_bwd, speedups=None):
        phases = {"fwd": {"median_ms": fwd}, "fwd_bwd": {"median_ms": fwd_bwd}}
        for phase, x in zip(phases, speedups or ()):
            phases[phase]["speedup"] = x
        return {"case": "K=L", "impl": impl, "B": 1, "H": 8, "L": 64, "K": 64, **phases}

    rows = [row("ours", 1.0, 2.0, (1.25, 0.5)), row("naive", 2.0, 2.0), row("sdpa", 20.0, 10.0)]
    console = Console(width=200, record=True)
    print_tables(rows, console)
    cells = [line.split("│") for line in console.export_text().splitlines() if "│" in line]
    lines = {c[5].strip(): c[9].strip() for c in cells}
    assert lines == {"ours": "1.25x, 0.50x", "naive": "1.00x, 1.00x", "sdpa": "0.10x, 0.20x"}


def test_layer_speed_h3_forms(tmp_path, monkeypatch):
    """--h3-forms: each column runs the form it names (the regrouped one through
    H3._heads_regrouped, the convolution one not), and the limit is restored after each call."""
    import layers
    import layers.h3 as h3_module
    from benchmarks import layer_speed

    calls = []
    regrouped = layers.H3._heads_regrouped
    monkeypatch.setattr(layers.H3, "_heads_regrouped", lambda *a: calls.append(1) or regrouped(*a))
    h3 = layers.build("h3", d_model=16, head_dim=8)
    x = torch.randn(2, 12, 16)
    limit = h3_module.REGROUPED_MAX_LEN
    layer_speed._h3_form(h3, layer_speed.H3_FORMS["h3[convolution]"])(x)
    assert calls == [] and h3_module.REGROUPED_MAX_LEN == limit
    layer_speed._h3_form(h3, layer_speed.H3_FORMS["h3[regrouped]"])(x)
    assert calls == [1] and h3_module.REGROUPED_MAX_LEN == limit
    out = tmp_path / "forms.json"
    args = ["--h3-forms", "--width", "16", "--max-len", "20", "--repeats", "1", "--out", str(out)]
    layer_speed.main(args)
    rows = json.loads(out.read_text())["rows"]
    assert [r["L"] for r in rows] == [20]
    assert all(rows[0][n]["median_ms"] > 0 for n in layer_speed.H3_FORMS)


def test_train_step_versions_train_alike(tmp_path):
    """benchmarks.train_step: its three versions of a run compute the same loss (the activation
    swap and the foreach optimizer change only rounding), the swap reaches the model (every
    MLP calls the activation given) and is undone after each call, the foreach version's
    optimizer is foreach and ours fused; the JSON has a paired row per (task, mixer)."""
    import copy

    import sandbox.model
    from benchmarks import train_step
    from kernels import gelu_tanh
    from sandbox.compare import expand, load_preset
    from sandbox.train import build_model, build_task
    from tasks import make_splits

    run = expand(load_preset("h3-table2"), ["model.d_model=16", "train.batch_size=4"], 1)[0]
    task = build_task(run.config)
    batch = make_splits(task, 4, 1, 1, seed=0).train
    model = build_model(run.config, task)
    calls = []

    def spy(x):
        calls.append(tuple(x.shape))
        return train_step._torch_gelu(x)

    ours = train_step._step_fn(run.config, model, batch)
    theirs = train_step._step_fn(run.config, copy.deepcopy(model), batch, spy)
    foreach = train_step._step_fn(run.config, copy.deepcopy(model), batch, fused=False)
    assert ours.optimizer.defaults["fused"] and not ours.optimizer.defaults["foreach"]
    assert foreach.optimizer.defaults["foreach"] and not foreach.optimizer.defaults["fused"]
    for i in range(3):
        a, b, c = ours(), theirs(), foreach()
        assert sandbox.model.gelu_tanh is gelu_tanh
        # From the same weights, rounding apart; AdamW's first steps (about lr times the sign
        # of each gradient) then let the versions drift apart a little.
        torch.testing.assert_close(a, b, rtol=1e-6 if i == 0 else 1e-3, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6 if i == 0 else 1e-3, atol=0)
    assert len(calls) == 3 * run.config.model.n_layers  # one MLP per block and step

    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        "base: {model: {d_model: 16, n_layers: 1}, train: {batch_size: 4},\n"
        "       task: {num_train: 64, num_valid: 16, num_test: 16}}\n"
        "tasks: {ar: {task: {name: associative_recall, params: {vocab_size: 6, seq_len: 8}}}}\n"
        "variants: {s4d: {model: {mixer: s4d}}, attention: {model: {mixer: attention}}}\n"
    )
    out = tmp_path / "t.json"
    train_step.main(["--preset", str(preset), "--repeats", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["task"], r["variant"]) for r in rows] == [("ar", "s4d"), ("ar", "attention")]
    assert all(r["ours"]["repeats"] == 2 for r in rows)
    assert all(r[b]["ours_speedup"] > 0 for r in rows for b in train_step.BASELINES)


def test_train_step_bad_preset_is_exit_2(tmp_path, capsys):
    from benchmarks import train_step

    with pytest.raises(SystemExit) as exit_info:
        train_step.main(["--preset", "no-such-preset", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


BENCHMARKS = ("fftconv", "generation", "layer_speed", "state_passing", "task_throughput")
COUNT_FLAGS = [(module, flag) for module in BENCHMARKS for flag in ("--repeats", "--threads")]
COUNT_FLAGS += [("train_step", "--repeats"), ("train_step", "--threads"), ("fftconv", "--lengths")]
COUNT_FLAGS += [("layer_speed", f) for f in ("--width", "--batch", "--max-len")]
COUNT_FLAGS += [("state_passing", f) for f in ("--lengths", "--chunks", "--channels")]
COUNT_FLAGS += [("generation", f) for f in ("--vocab", "--batch", "--prompts", "--new-tokens")]


@pytest.mark.parametrize("module, flag", COUNT_FLAGS)
def test_benchmarks_reject_counts_below_one(module, flag, tmp_path, capsys):
    """--repeats 0 (no time to take a median of), --threads 0, a length, width or batch of 0
    are one argparse line naming the flag, exit 2, before anything runs or is written (they
    raised from inside torch or the layers)."""
    import importlib

    bench = importlib.import_module(f"benchmarks.{module}")
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, "0", "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("module", [*BENCHMARKS, "train_step"])
def test_benchmarks_refuse_threads_and_outs_they_would_crash_on(module, tmp_path, capsys):
    """--threads 100000 segfaulted the OpenMP runtime; an --out that is a directory, or under
    a file, failed at the end with a traceback, every measurement lost."""
    import importlib

    bench = importlib.import_module(f"benchmarks.{module}")
    (tmp_path / "afile").write_text("")
    for argv, message in [
        (["--threads", "1025", "--out", str(tmp_path / "x.json")], "must be at most 1024"),
        (["--out", str(tmp_path)], f"{tmp_path} is a directory; give a file path"),
        (["--out", str(tmp_path / "afile" / "x.json")], f"cannot write under {tmp_path}/afile"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_benchmark_option_errors(tmp_path, capsys):
    from benchmarks import fftconv, layer_speed

    for bench, argv, message in [
        (fftconv, ["--min-seconds", "nan"], "argument --min-seconds: must be a number of seconds"),
        (fftconv, ["--min-seconds", "1e308"], "must be a number of seconds in [0, 3600]"),
        (layer_speed, ["--max-len", "10"], "--max-len 10 is below every length"),
        (layer_speed, ["--h3-forms", "--width", "12"], "multiple of H3's head_dim 8, got 12"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*argv, "--out", str(tmp_path / "never.json")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_benchmark_json_is_readable_by_others(tmp_path):
    from benchmarks.fftconv import write_json

    write_json({"a": 1}, tmp_path / "r.json")  # a temp file's 0600 was kept by the rename
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert (tmp_path / "r.json").stat().st_mode == plain.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "r.json"]  # no temp left


def test_generation_ratios_are_paired_by_repeat():
    """A slow spell in repeat 1 hits both models: the paired ratio is 0.5 in two repeats of
    three, while the ratio of the medians (3 / 2) would call the hybrid faster."""
    from benchmarks.generation import MODELS, summarise

    rows = []
    for T in (8, 16):
        for m in MODELS:
            runs = {"hybrid": [1.0, 10.0, 3.0], "transformer": [2.0, 20.0, 1.0]}.get(m, [1.0] * 3)
            fields = ("decode_tokens_per_s", "tokens_per_s", "decode_ms_per_token")
            row = {"prompt_len": T, "model": m, **dict.fromkeys(fields, 1.0)}
            rows.append(row | {f"runs_{f}": runs for f in fields[:2]})
    for entry in summarise(rows):
        assert entry["decode_ratio"] == entry["e2e_ratio"] == 0.5


def test_generation_benchmark_runs_short_prompts_and_keeps_what_it_timed(tmp_path, monkeypatch):
    """Prompts shorter than the warm-up's 16 tokens with learned positions (max_len 12 here)
    raised before anything was timed; and the JSON is written after each prompt length, so a
    run that fails later (here: the training part) keeps its generation rows."""
    from benchmarks import generation

    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(generation, "time_training", out_of_memory)
    out = tmp_path / "gen.json"
    argv = ["--prompts", "4", "8", "--new-tokens", "4", "--batch", "1", "--repeats", "1"]
    with pytest.raises(MemoryError):
        generation.main([*argv, "--vocab", "64", "--train-seq-len", "8", "--out", str(out)])
    rows = json.loads(out.read_text())["generation"]
    assert [(r["prompt_len"], r["model"]) for r in rows] == [
        (T, m) for T in (4, 8) for m in generation.MODELS
    ]
