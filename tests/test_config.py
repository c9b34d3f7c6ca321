"""Configs: unknown keys and wrong types are errors naming the field; overrides; round trip."""

import copy

import pytest
import yaml

from sandbox.config import (
    ConfigError,
    apply_override,
    build_config,
    deep_merge,
    dump_config,
    load_config,
    read_yaml,
)


def test_defaults_and_overrides():
    c = build_config({}, ["train.lr=1.0e-3", "model.mixer_params.head_dim=8", "task.name=x"])
    assert c.train.lr == 1e-3
    assert c.model.mixer_params == {"head_dim": 8}
    assert c.task.name == "x"


def test_a_mapping_override_merges_into_its_section():
    """train={lr: 0.1} replaced the whole train section: the preset's steps cap, early stop
    and loss_on went back to their defaults without a word."""
    base = {"train": {"max_steps": 50, "loss_on": "answers", "target_accuracy": 0.9}}
    c = build_config(base, ["train={lr: 0.1, batch_size: 8}"])
    assert (c.train.lr, c.train.batch_size) == (0.1, 8)
    assert (c.train.max_steps, c.train.loss_on, c.train.target_accuracy) == (50, "answers", 0.9)
    assert build_config({}, ["model.mixer_params={d_state: 8}"]).model.mixer_params == {
        "d_state": 8
    }
    # An empty mapping clears its section, in overrides and in merged bases alike: merged,
    # `mixer_params={}` kept a base's head_dim, and nothing could drop it.
    base = {"model": {"mixer": "h3", "mixer_params": {"head_dim": 8}}}
    c = build_config(base, ["model.mixer=attention", "model.mixer_params={}"])
    assert (c.model.mixer, c.model.mixer_params) == ("attention", {})
    assert deep_merge(base, {"model": {"mixer_params": {}}})["model"] == {
        "mixer": "h3",
        "mixer_params": {},
    }
    assert deep_merge(base, {}) == base  # an empty variant or child changes nothing


def test_overrides_leave_the_callers_dicts_alone():
    base = {"model": {"mixer": "h3", "mixer_params": {"d_state": 8}}, "train": {"lr": 1e-3}}
    before = copy.deepcopy(base)
    build_config(base, ["model.mixer_params.head_dim=8", "train.lr=5e-4"])
    assert base == before
    assert build_config(base).model.mixer_params == {"d_state": 8}
    merged = deep_merge(base, {"train": {"epochs": 3}})
    apply_override(merged, "model.mixer_params.d_state=4")
    merged["train"]["lr"] = 1.0
    assert base == before


@pytest.mark.parametrize(
    "data, field",
    [
        ({"modle": {}}, "'modle'"),
        ({"train": {"lrr": 0.1}}, "'train.lrr'"),
        ({"model": {"d_model": "wide"}}, "'model.d_model'"),
        ({"train": {"schedule": "cosin"}}, "'train.schedule'"),
        ({"train": {"lr": -1}}, "'train.lr'"),
        ({"seed": 2**64}, "'seed'"),
        ({"train": {"betas": [1.5, 0.9]}}, "'train.betas.0'"),
        # No silent conversion (true -> 1, 8.0 -> 8) and no infinite values; an int is a float.
        ({"train": {"batch_size": True}}, "'train.batch_size'"),
        ({"model": {"n_layers": 2.0}}, "'model.n_layers'"),
        ({"seed": True}, "'seed'"),
        ({"train": {"lr": True}}, "'train.lr'"),
        ({"train": {"betas": [0.9, True]}}, "'train.betas.1'"),
        ({"train": {"lr": float("inf")}}, "'train.lr'"),
        ({"train": {"grad_clip": float("inf")}}, "'train.grad_clip'"),
        # Past 2^31 - 1 torch raised a TypeError deep inside, naming nothing.
        ({"model": {"d_model": 10**20}}, "'model.d_model'"),
        ({"task": {"num_train": 2**31}}, "'task.num_train'"),
        ({"threads": 10**11}, "'threads'"),
        ({"threads": 100_000}, "'threads'"),  # a segfault in OpenMP at the first parallel op
        ({"threads": 1024}, None),
        ({"task": {"num_train": 2**31 - 1}}, None),
        ({"train": {"lr": 1, "betas": [0, 0.5]}}, None),
        # Sections no layer reads would never be checked by layers.build.
        ({"model": {"attn_params": {"num_heads": 2}}}, "model.attn_params"),
        ({"model": {"mixer": "attention", "attn_layers": [0], "attn_params": {}}}, None),
        (
            {"model": {"mixer": "attention", "attn_layers": [0], "attn_params": {"x": 1}}},
            "model.attn_params",
        ),
        (
            {"model": {"n_layers": 1, "attn_layers": [0], "mixer_params": {"x": 1}}},
            "model.mixer_params",
        ),
    ],
)
def test_bad_fields_are_named(data, field):
    if field is None:  # the valid neighbour of a bad case
        build_config(data)
        return
    with pytest.raises(ConfigError) as e:
        build_config(data)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


@pytest.mark.parametrize("override", ["nokey", "a..b=1", "model.d_model.x=1"])
def test_bad_overrides(override):
    with pytest.raises(ConfigError):
        build_config({}, [override])


def test_yaml_round_trip(tmp_path):
    c = build_config({"model": {"mixer": "attention", "attn_layers": [1]}}, ["train.epochs=3"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(c))
    assert load_config(path) == c
    assert yaml.safe_load(dump_config(c))["train"]["epochs"] == 3


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["", "  \n\n", "# only a comment\n---\n"])
def test_an_empty_file_is_an_error_naming_it(tmp_path, text):
    """Was read as {}: `sandbox train empty.yaml` trained every default for ~40 minutes."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file '{path}' is empty"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"space file '{path}' is empty"):
        read_yaml(path, "space file")


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML kept the last of two keys without a word: a second lr lower in a section silently
    replaced the first. Merge keys (<<) may still repeat what they merge."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  batch_size: 16\n  lr: 5.0e-2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: duplicate key 'lr'.*line 4"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'head_dim'"):
        build_config({}, ["model.mixer_params={head_dim: 8, head_dim: 4}"])
    path.write_text("x: &t {lr: 0.1, epochs: 2}\ntrain: {<<: *t, lr: 0.2}\n")
    assert read_yaml(path, "file")["train"] == {"lr": 0.2, "epochs": 2}


def test_a_config_setting_some_sections_or_none_explicitly_is_valid(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# only the train section\ntrain: {epochs: 3}\n")
    assert load_config(path) == build_config({"train": {"epochs": 3}})
    path.write_text("{}  # every default, said explicitly\n")
    assert load_config(path) == build_config({})


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train: {lr: 1e-3}  # d\xe9faut\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"config file '{path}' is not UTF-8 text (byte 0xe9 at offset 22)"


def test_exponent_floats_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; the free-form sections would pass it on as one.
    path = tmp_path / "c.yaml"
    path.write_text("model: {mixer_params: {dt_min: 1e-4}}\ntask: {params: {x: -2E3}}\n")
    c = load_config(path, ["train.lr=3e-4", "model.attn_params.y=.5e1", "model.attn_layers=[1]"])
    assert c.model.mixer_params == {"dt_min": 1e-4} and c.task.params == {"x": -2000.0}
    assert c.train.lr == 3e-4 and c.model.attn_params == {"y": 5.0}
    assert load_config(path, ["task.name=e5"]).task.name == "e5"  # not a number


def test_integers_follow_yaml_1_2_and_dumped_strings_stay_strings(tmp_path):
    """YAML 1.1 (PyYAML) read seed=010 as octal 8 and batch_size=1:30 as base-60 90; and
    dump_config wrote the string "1e5" plain, which this loader reads back as a number."""
    c = build_config({}, ["seed=010", "task.params.seq_len=020", "train.batch_size=0x10"])
    assert (c.seed, c.task.params["seq_len"], c.train.batch_size) == (10, 20, 16)
    assert build_config({}, ["task.params.at=1:30"]).task.params == {"at": "1:30"}
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_config({}, ["train.batch_size=1:30"])  # a string, not 90
    c = build_config({}, ["model.mixer_params={a: '1e5', b: '010', c: 1e5}"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(c))
    assert load_config(path) == c
    assert load_config(path).model.mixer_params == {"a": "1e5", "b": "010", "c": 100000.0}


@pytest.mark.parametrize(
    "value", ["!!bool maybe", "!!timestamp x", "!!float", "!!map [1]", "!!int 0b11"]
)
def test_a_tag_that_cannot_be_built_is_a_one_line_error_naming_its_source(tmp_path, value):
    """PyYAML's constructors raise plain exceptions (KeyError, IndexError...) on a bad tagged
    scalar: a file names its path, an override its key, as for any other YAML error."""
    path = tmp_path / "c.yaml"
    path.write_text(f"seed: {value}\n")
    with pytest.raises(ConfigError, match=f"{path.name}' is not valid YAML: a tagged value"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="override train.restore_best: .*a tagged value"):
        build_config({}, [f"train.restore_best={value}"])
