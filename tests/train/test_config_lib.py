"""Tests for train/config_lib.py and the `python -m train` launcher: typed overrides, typos."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from train import config_lib
from train.__main__ import main
from train.config_lib import ConfigError, apply_overrides, load_config_script
from train.defaults import base_config

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def config():
    config = base_config()
    config.extra = ml_collections.ConfigDict({"shape": (2, 3)})  # a tuple-valued field
    config.lock()
    return config


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.num_steps=7", "train.num_steps", 7),
        ("optimizer.learning_rate=3e-4", "optimizer.learning_rate", 3e-4),
        ("optimizer.learning_rate=1", "optimizer.learning_rate", 1.0),  # int text, float field
        ("train.tensorboard=false", "train.tensorboard", False),
        ("train.async_checkpoint=True", "train.async_checkpoint", True),
        ("train.progress_bar=0", "train.progress_bar", False),
        ("data.tokenizer=byte", "data.tokenizer", "byte"),
        ("data.source=/tmp/my corpus.txt", "data.source", "/tmp/my corpus.txt"),
        ("train.sample_prompt=123", "train.sample_prompt", "123"),  # a str field stays a str
        ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
        ("model.num_kv_heads=2", "model.num_kv_heads", 2),  # None default takes any literal
        ("extra.shape=(4, 5, 6)", "extra.shape", (4, 5, 6)),
        ("extra.shape=[7, 8]", "extra.shape", (7, 8)),  # a list becomes the field's tuple
        ("data.val_names=('hamlet', 'macbeth')", "data.val_names", ("hamlet", "macbeth")),
    ],
)
def test_override_parses_to_the_field_type(config, override, key, expected):
    apply_overrides(config, [override])
    group, name = key.split(".")
    value = config[group][name]
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_in_order(config):
    apply_overrides(config, ["train.num_steps=5", "train.num_steps=9"])
    assert config.train.num_steps == 9


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.num_step=3", "train.num_steps"),
        ("train.num_stepz=3", "train.num_steps"),
        ("trian.num_steps=3", "train.num_steps"),
        ("optimizer.learning_rat=0.1", "optimizer.learning_rate"),
        ("model.num_layer=3", "model.num_layers"),
    ],
)
def test_unknown_key_suggests_the_nearest(config, override, suggestion):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        apply_overrides(config, [override])
    assert repr(suggestion) in str(info.value) and override.split("=")[0] in str(info.value)


@pytest.mark.parametrize(
    "override, expected_type",
    [
        ("train.num_steps=abc", "int"),
        ("train.num_steps=1.5", "int"),
        ("train.num_steps=True", "int"),
        ("optimizer.learning_rate=fast", "float"),
        ("train.tensorboard=maybe", "bool"),
        ("extra.shape=7", "tuple"),
    ],
)
def test_wrong_type_names_key_and_expected_type(config, override, expected_type):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        apply_overrides(config, [override])
    assert key in str(info.value) and expected_type in str(info.value)


def test_malformed_overrides(config):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(config, ["train.num_steps"])
    with pytest.raises(ConfigError, match="group"):
        apply_overrides(config, ["train=3"])


def test_split_cli_overrides():
    overrides, rest = config_lib.split_cli_overrides(
        [
            "--config",
            "x.py:runlocal",
            "--config.train.num_steps=3",
            "--workdir",
            "w",
            "--config.data.seq_len",
            "16",
        ]
    )
    assert overrides == ["train.num_steps=3", "data.seq_len=16"]
    assert rest == ["--config", "x.py:runlocal", "--workdir", "w"]
    with pytest.raises(ConfigError, match="needs a value"):
        config_lib.split_cli_overrides(["--config.train.num_steps"])


def test_flat_keys(config):
    keys = config_lib.flat_keys(config)
    assert "train.num_steps" in keys and "model.num_layers" in keys and "extra.shape" in keys


# ------------------------------------------------------------------------------------------------
# Config scripts.


def _write_script(tmp_path, body):
    path = tmp_path / "exp.py"
    path.write_text(body)
    return path


def test_load_config_script_passes_arg_and_locks(tmp_path):
    path = _write_script(
        tmp_path,
        (
            "from train.defaults import base_config\n"
            "def get_config(arg=None):\n"
            "    config = base_config()\n"
            "    config.data.source = repr(arg)\n"
            "    return config\n"
        ),
    )
    assert load_config_script(f"{path}:runlocal").data.source == "'runlocal'"
    config = load_config_script(str(path))
    assert config.data.source == "None"
    with pytest.raises(AttributeError):
        config.train.num_stepz = 3  # locked: no new keys


def test_load_config_script_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_script(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="get_config"):
        load_config_script(str(_write_script(tmp_path, "x = 1\n")))
    with pytest.raises(ConfigError, match="ConfigDict"):
        load_config_script(
            str(_write_script(tmp_path, "def get_config(arg=None):\n    return {}\n"))
        )


def test_shakespeare_runlocal_variant():
    script = REPO / "experiments" / "shakespeare_char.py"
    full, local = load_config_script(str(script)), load_config_script(f"{script}:runlocal")
    assert local.train.num_steps < full.train.num_steps
    assert local.model.num_layers < full.model.num_layers


# ------------------------------------------------------------------------------------------------
# The launcher.


def test_main_print_config_applies_overrides(tmp_path, capsys):
    script = REPO / "experiments" / "shakespeare_char.py"
    code = main(
        [
            "--config",
            f"{script}:runlocal",
            "--workdir",
            str(tmp_path),
            "--print_config",
            "--config.train.num_steps=3",
        ]
    )
    assert code == 0 and "num_steps: 3" in capsys.readouterr().out


def test_main_wrong_type_exits_2(tmp_path, capsys):
    script = REPO / "experiments" / "shakespeare_char.py"
    code = main(
        ["--config", str(script), "--workdir", str(tmp_path), "--config.train.num_steps=1.5"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train.num_steps" in err and "int" in err


def test_cli_typo_exits_2_with_suggestion(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config",
            "experiments/shakespeare_char.py",
            "--workdir",
            str(tmp_path / "run"),
            "--config.train.num_stepz=3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.num_stepz" in proc.stderr and "did you mean 'train.num_steps'" in proc.stderr
    assert not (tmp_path / "run").exists()  # failed before touching the workdir
