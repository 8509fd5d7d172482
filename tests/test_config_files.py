"""Flags from a JSON/YAML file, as users write them: a file alone, a file plus flags that override
it, and the mistakes (wrong types, YAML syntax, unknown keys) as one `error:` line, exit 2."""

from __future__ import annotations

import json
import os
import re

import pytest

from kandinsky_common.flags import parse_config
from tests.helpers import run_script

GOOD_YAML = """\
train_data_dir: data
learning_rate: 1e-5          # PyYAML reads this as the string '1e-5'
validation_prompts: ["a cat", "a dog"]
use_ema: true
max_train_steps: 12
output_dir: out
"""


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_yaml_values_are_converted_like_typed_flags(in_tmp):
    (in_tmp / "c.yaml").write_text(GOOD_YAML)
    cfg = parse_config(["c.yaml"], "prior")
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.validation_prompts == ["a cat", "a dog"]
    assert cfg.use_ema is True and cfg.max_train_steps == 12
    assert cfg.output_dir == str(in_tmp / "out") and cfg.train_data_dir == str(in_tmp / "data")


def test_flags_after_the_file_override_it(in_tmp):
    (in_tmp / "c.yaml").write_text(GOOD_YAML)
    cfg = parse_config(
        ["c.yaml", "--learning_rate", "3e-4", "--output_dir", "other", "--seed", "7"], "prior"
    )
    assert cfg.learning_rate == 3e-4 and cfg.seed == 7
    assert cfg.output_dir == str(in_tmp / "other") and cfg.max_train_steps == 12


def test_json_file_plus_flags(in_tmp):
    (in_tmp / "c.json").write_text(json.dumps({"train_data_dir": "d", "resolution": 128}))
    cfg = parse_config(["c.json", "--resolution", "64"], "decoder")
    assert cfg.resolution == 64 and cfg.train_data_dir == str(in_tmp / "d")


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("typo.yaml", "train_data_dir: d\nlearning_rate: abc\n", "invalid float value: 'abc'"),
        ("steps.yaml", "train_data_dir: d\nmax_train_steps: 1.5\n", "invalid int value: '1.5'"),
        ("syntax.yaml", "train_data_dir: d\nlearning_rate: [1\n", "is not valid YAML (line"),
        ("syntax.json", '{"train_data_dir": "d",}', "is not valid JSON (line 1"),
        ("key.yaml", "train_data_dir: d\nlearnin_rate: 1\n", "'learnin_rate' is not a flag"),
        ("list.yaml", "- a\n- b\n", "not a mapping of flag names"),
        ("choice.yaml", "train_data_dir: d\nlr_scheduler: cosin\n", "invalid choice: 'cosin'"),
    ],
)
def test_config_file_mistakes_are_one_line(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    script = "train_text_to_image_prior.py"
    proc = run_script(script, name, "--seed", "0", check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: config file {name}") and says in line
    assert os.listdir(tmp_path) == [name]  # nothing written


def test_help_has_a_description_and_each_default_once():
    proc = run_script("train_text_to_image_decoder.py", "--help")
    assert "Fine-tune the Kandinsky 2.2 decoder" in proc.stdout
    options = proc.stdout.split("options:", 1)[1]
    # One option's help runs until the next line that starts an option.
    helps = re.split(r"\n  -", options)
    doubled = [h.split()[0] for h in helps if h.count("(default") > 1]
    assert not doubled
