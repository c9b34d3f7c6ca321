"""The difficulty-grid presets (mqar, recall-suite, length-scaling): their grids, the figure
kinds, and test_params (a task row tested on a variant of its task), without full training."""

import csv
import json
import re

import pytest
import torch
import yaml

import tasks
from sandbox import report
from sandbox.compare import compare, expand, heldout_test, load_preset
from sandbox.config import ConfigError
from sandbox.io import load_checkpoint, load_model_weights
from sandbox.train import RunDirError, build_model

PNG = b"\x89PNG"


def _by_key(runs):
    return {(r.task, r.variant): r.config for r in runs}


def test_mqar_grid():
    preset = load_preset("mqar")
    runs = expand(preset)
    assert len(runs) == 3 * 10  # (seq_len, pairs) x (5 mixers x 2 widths), one seed
    assert preset.figures == ["gaps", "width"]
    configs = _by_key(runs)
    h3 = configs[("L256-kv16", "h3-128")]
    assert (h3.model.mixer, h3.model.d_model, h3.model.mixer_params) == ("h3", 128, {"head_dim": 8})
    assert h3.task.params == {"vocab_size": 256, "seq_len": 256, "num_kv_pairs": 16}
    assert h3.train.loss_on == "answers" and h3.train.target_accuracy == 0.99
    attn = configs[("L64-kv4", "attention-64")]
    assert (attn.model.mixer, attn.model.d_model) == ("attention", 64)
    assert {c.model.d_model for c in configs.values()} == {64, 128}
    assert {c.model.mixer for c in configs.values()} == {"attention", "h3", "hyena", "s4d", "gss"}
    assert {c.task.params["num_kv_pairs"] for c in configs.values()} == {4, 8, 16}


def test_recall_suite_grid():
    preset = load_preset("recall-suite")
    runs = expand(preset)
    assert len(runs) == 8 * 5
    assert preset.figures == ["gaps", "heatmap"]
    configs = _by_key(runs)
    assert {c.task.name for c in configs.values()} == {
        "associative_recall",
        "induction_head",
        "mqar",
        "selective_copying",
        "noisy_recall",
        "fuzzy_recall",
        "memorization",
        "compression",
    }
    assert configs[("associative_recall", "h3")].train.loss_on == "all"  # the paper's loss
    assert configs[("compression", "gss")].train.loss_on == "answers"
    assert configs[("induction_head", "h3")].model.mixer_params == {"head_dim": 8}
    assert preset.test_params == {"fuzzy_recall": {"key_len": 3}}


def test_length_scaling_grid():
    preset = load_preset("length-scaling")
    runs = expand(preset)
    assert len(runs) == 5 * 3
    assert preset.figures == ["gaps", "length"]
    configs = _by_key(runs)
    lengths = sorted({c.task.params["seq_len"] for c in configs.values()})
    assert lengths == [64, 128, 256, 512, 1024]
    assert {c.task.params["vocab_size"] for c in configs.values()} == {130}
    assert configs[("L1024", "hyena")].model.mixer == "hyena"
    assert {v for _, v in configs} == {"attention", "h3", "hyena"}


def _synthetic_rows(preset):
    """A made-up result for every run of the preset, as compare.collect shapes them."""
    rows = []
    for i, r in enumerate(expand(preset)):
        seq_len = r.config.task.params["seq_len"]
        rows.append(
            {
                "task": r.task,
                "mixer": r.variant,
                "seed": r.seed,
                "lr": r.lr,
                "layer": r.config.model.mixer,
                "d_model": r.config.model.d_model,
                "seq_len": seq_len,
                "test_accuracy": (i % 7) / 6,
                "wall_s": seq_len / 10 + i,
            }
        )
    return rows


@pytest.mark.parametrize(
    "name, kind", [("mqar", "width"), ("recall-suite", "heatmap"), ("length-scaling", "length")]
)
def test_figure_kinds_render(tmp_path, name, kind):
    preset = load_preset(name)
    levels = _made_up_levels(preset)
    rows = _synthetic_rows(preset)
    path = tmp_path / f"{kind}.png"
    report.FIGURES[kind](rows[:-1], preset, levels, path)  # a missing run leaves a gap
    assert path.read_bytes()[:4] == PNG
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temp file left


def _made_up_levels(preset):
    """Baseline levels for every task row: its real chance, and a no-recall level that differs
    by row (measuring the real ones takes seconds a preset), none for the first row."""
    chance = report.random_accuracy(expand(preset))
    return {
        t: {"chance": c} | ({"no recall": 20.0 + i} if i else {})
        for i, (t, c) in enumerate(chance.items())
    }


@pytest.mark.parametrize("name, kind", [("mqar", "gaps"), ("length-scaling", "length")])
def test_figures_draw_each_tasks_baselines(monkeypatch, tmp_path, name, kind):
    """Chance dashed and the no-recall guess dotted, at each panel's task's levels; a
    baseline some task lacks is left out of the length figure's one accuracy panel."""
    preset = load_preset(name)
    levels = _made_up_levels(preset)
    figures = []
    monkeypatch.setattr(report, "_save_png", lambda fig, path: figures.append(fig))
    report.FIGURES[kind](_synthetic_rows(preset), preset, levels, tmp_path / "x.png")

    def drawn(ax, style):
        return [list(line.get_ydata()) for line in ax.lines if line.get_linestyle() == style]

    if kind == "gaps":
        titles = {ax.get_title().removeprefix("task = "): ax for ax in figures[0].axes}
        for task, level in levels.items():
            assert drawn(titles[task], "--") == [[level["chance"]] * 2]
            no_recall = [[level["no recall"]] * 2] if "no recall" in level else []
            assert drawn(titles[task], ":") == no_recall
    else:
        assert drawn(figures[0].axes[0], ":") == []  # L64 has none
        # Every length with one: a line through each length's level. Chance is one level.
        levels["L64"]["no recall"] = 19.0
        report.FIGURES[kind](_synthetic_rows(preset), preset, levels, tmp_path / "x.png")
        assert drawn(figures[1].axes[0], ":") == [[19.0, 21.0, 22.0, 23.0, 24.0]]
        assert drawn(figures[1].axes[0], "--") == [[levels["L64"]["chance"]] * 2]


def test_baselines_are_those_of_the_test_split():
    """A task row's chance and no-recall levels come from the task its test split is drawn
    from: with the preset's test_params on top (fuzzy_recall's 3-token keys)."""
    from tasks.baselines import no_recall_accuracy

    preset = load_preset("recall-suite")
    fuzzy = [r for r in expand(preset) if r.task == "fuzzy_recall"]
    params = fuzzy[0].config.task.params
    levels = report.baseline_levels(fuzzy, preset.test_params)["fuzzy_recall"]
    tested = tasks.build("fuzzy_recall", **params, key_len=3)
    assert levels == {
        "chance": 100 * tested.random_accuracy,
        "no recall": 100 * max(no_recall_accuracy(tested).values()),
    }
    trained = tasks.build("fuzzy_recall", **params)
    assert levels["no recall"] != 100 * max(no_recall_accuracy(trained).values())


def test_unknown_figure_and_test_params_rows_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": {"t": {}}, "variants": {"v": {}}, "figures": ["pie"]}))
    with pytest.raises(ConfigError, match="'figures.0'"):
        load_preset(str(bad))
    preset = load_preset("recall-suite").model_copy(update={"test_params": {"nope": {}}})
    with pytest.raises(ConfigError, match=r"test_params: \['nope'\] are not task rows"):
        expand(preset)
    # Bad values are caught before anything trains, not once the grid is done.
    for params, match in [({"key_len": 4}, "key_len must be <= 3"), ({"seq_len": 999}, "length")]:
        bad = preset.model_copy(update={"test_params": {"fuzzy_recall": params}})
        with pytest.raises(ConfigError, match=f"test_params of 'fuzzy_recall'.*{match}"):
            expand(bad)


def _tiny_grid(tmp_path):
    preset = {
        "description": "tiny grid",
        "base": {
            "threads": 1,
            "task": {"num_train": 64, "num_valid": 32, "num_test": 32},
            "model": {"n_layers": 1, "mlp_ratio": 1},
            "train": {"max_steps": 3, "eval_every": 3, "batch_size": 16, "loss_on": "answers"},
        },
        "tasks": {
            "ar": {"task": {"name": "associative_recall", "params": {"seq_len": 12}}},
            "fuzzy": {
                "task": {
                    "name": "fuzzy_recall",
                    "params": {
                        "vocab_size": 12,
                        "seq_len": 16,
                        "num_kv_pairs": 2,
                        "max_key_len": 2,
                        "max_value_len": 2,
                    },
                }
            },
        },
        "variants": {
            "attention-16": {"model": {"mixer": "attention", "d_model": 16}},
            "attention-32": {"model": {"mixer": "attention", "d_model": 32}},
            "s4d-16": {"model": {"mixer": "s4d", "d_model": 16, "mixer_params": {"d_state": 4}}},
        },
        "test_params": {"fuzzy": {"key_len": 2}},
        "figures": ["width", "heatmap", "length"],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return load_preset(str(path))


def _heldout_oracle(preset, out, variant, params):
    run = next(r for r in expand(preset) if r.task == "fuzzy" and r.variant == variant)
    c = run.config
    task = tasks.build(c.task.name, **c.task.params)
    test = tasks.make_splits(
        tasks.build(c.task.name, **{**c.task.params, **params}), 0, 0, c.task.num_test, c.seed
    ).test
    seen = tasks.make_splits(task, c.task.num_train, c.task.num_valid, 0, c.seed)
    rows = {tuple(x) for s in (seen.train, seen.valid) for x in s.inputs.tolist()}
    keep = [i for i, x in enumerate(test.inputs.tolist()) if tuple(x) not in rows]
    model = build_model(c, task).eval()
    load_model_weights(
        model, load_checkpoint(out / "runs" / run.run_id / "model.safetensors")["model"]
    )
    with torch.no_grad():
        pred = model(test.inputs[keep]).argmax(-1)
    mask, targets = test.answer_mask[keep], test.targets[keep]
    hit = (pred == targets) & mask
    return {
        "test_accuracy": float(hit.sum() / mask.sum()),
        "test_exact": float((hit.sum(1) == mask.sum(1)).double().mean()),
        "num_test": len(keep),
    }


def test_tiny_grid_end_to_end(tmp_path):
    preset = _tiny_grid(tmp_path)
    out = tmp_path / "out"
    chosen = compare(preset, out, workers=1, progress=False)
    assert len(chosen) == 6
    for kind in ("width", "heatmap", "length"):
        assert (out / f"{kind}.png").read_bytes()[:4] == PNG
    assert not (out / "gaps.png").exists()  # only the figures the preset names

    parsed = list(csv.DictReader((out / "results.csv").open()))
    assert list(parsed[0]) == report.CSV_COLUMNS
    assert [(r["task"], r["mixer"]) for r in parsed][:3] == [
        ("ar", "attention-16"),
        ("ar", "attention-32"),
        ("ar", "s4d-16"),
    ]
    rows = {(r["task"], r["mixer"]): r for r in chosen}
    assert rows[("ar", "attention-32")]["d_model"] == 32
    assert rows[("fuzzy", "s4d-16")]["layer"] == "s4d"
    assert rows[("fuzzy", "s4d-16")]["seq_len"] == 16
    # The fuzzy row's test accuracy is the longest-key split's; the run's own is kept.
    for variant in preset.variants:
        row = rows[("fuzzy", variant)]
        held = json.loads(next(out.glob(f"runs/fuzzy__{variant}__*/heldout.json")).read_text())
        assert held["params"] == {"key_len": 2} and 0 < held["num_test"] <= 32
        assert row["test_accuracy"] == held["test_accuracy"]
        own = json.loads(next(out.glob(f"runs/fuzzy__{variant}__*/result.json")).read_text())
        assert row["run_test_accuracy"] == own["test_accuracy"]
        # Oracle: key_len=2 examples of the test stream not seen in training, by brute force.
        oracle = _heldout_oracle(preset, out, variant, {"key_len": 2})
        assert held["num_test"] == oracle["num_test"]
        for key in ("test_accuracy", "test_exact"):
            assert held[key] == pytest.approx(oracle[key], abs=1e-6), (variant, key)
    assert "run_test_accuracy" not in rows[("ar", "s4d-16")]
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| mixer | ar | ar steps | fuzzy | fuzzy steps |"  # no paper

    # Finished runs are not reused for another config; a seed override is pointed to --seeds.
    with pytest.raises(RunDirError, match="another config") as refused:
        compare(preset, out, workers=1, progress=False, overrides=["train.max_steps=4"])
    assert "changed: train.max_steps: saved" in str(refused.value)
    assert str(refused.value).endswith(", now 4); choose another --out")
    with pytest.raises(ConfigError, match="use --seeds"):
        compare(preset, out, workers=1, progress=False, overrides=["seed=3"])

    # test_params must keep the vocabulary and length the model was built for.
    run = next(r for r in expand(preset) if r.task == "fuzzy")
    run_dir = out / "runs" / run.run_id
    with pytest.raises(ConfigError, match="change the vocabulary or length"):
        heldout_test(run, run_dir, {"seq_len": 18})
    with pytest.raises(ConfigError, match="key_len must be <= 2"):
        heldout_test(run, run_dir, {"key_len": 3})

    # A damaged heldout.json is a cache miss: computed again, the same figures. A damaged
    # result.json is named (its run is skipped as finished, so the grid could not go on):
    # a bare JSON error, or a KeyError traceback for valid JSON of another shape.
    cache = run_dir / "heldout.json"
    figures = json.loads(cache.read_text())
    for damaged in ('{"para', "[]", "{}"):
        cache.write_text(damaged)
        assert heldout_test(run, run_dir, {"key_len": 2}) == figures
        assert json.loads(cache.read_text()) == figures
    result = run_dir / "result.json"
    for damaged, why in (('{"test_', "is not valid JSON"), ("[1, 2]", "holds no JSON object"),
                         ('{"test_accuracy": 0.5}', "lacks test_exact, val_accuracy")):  # fmt: skip
        result.write_text(damaged)
        with pytest.raises(ValueError, match=f"{re.escape(str(result))} {why}.*delete it to tr"):
            compare(preset, out, workers=1, progress=False)


def test_table_baselines_are_those_of_the_test_split(tmp_path):
    """write_all's table takes each row's chance and no-recall levels from the task its test
    split is drawn from: recall-suite's fuzzy_recall is tested on 3-token keys."""
    from tasks.baselines import no_recall_accuracy

    preset = load_preset("recall-suite")
    preset = preset.model_copy(update={"tasks": {"fuzzy_recall": preset.tasks["fuzzy_recall"]}})
    runs = expand(preset)
    report.write_all([], preset, runs, tmp_path, show=False)
    params = runs[0].config.task.params
    tested = tasks.build("fuzzy_recall", **params, key_len=3)
    expected = 100 * max(no_recall_accuracy(tested).values())
    trained = 100 * max(no_recall_accuracy(tasks.build("fuzzy_recall", **params)).values())
    assert f"{expected:.1f}" != f"{trained:.1f}"
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2].startswith(f"| random | {100 * tested.random_accuracy:.1f} |")
    assert lines[3].startswith(f"| no recall | {expected:.1f} |"), lines[3]
