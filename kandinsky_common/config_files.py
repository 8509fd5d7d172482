"""Flags from a .json/.yaml file given first on the command line: read and checked in one line
per mistake, then turned into command-line tokens so that argparse converts them as typed flags
and later flags override them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from kandinsky_common.errors import UserError

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def load_config_file(path: Path) -> dict:
    """The flags in a .json/.yaml file, as a dict of flag name -> value (syntax checked)."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass the path of a .json/.yaml file")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"config file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix that line"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(
            f"config file {path} is not valid YAML ({where}{problem}); fix that line"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} cannot be read ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path} holds a {type(data).__name__}, not a mapping of flag names to "
            "values; write one `flag_name: value` per line"
        )
    return data


def file_to_argv(path: Path, data: dict, config_cls: type) -> list[str]:
    """The file's flags as command-line tokens, so that argparse converts and checks file values
    exactly as typed flags (a YAML `1e-5` is a string to PyYAML) and later flags override them."""
    names = {f.name: f for f in dataclasses.fields(config_cls)}
    argv: list[str] = []
    for key, value in data.items():
        if key not in names:
            raise UserError(
                f"config file {path}: {key!r} is not a flag of this script; fix the key (flag "
                "names without dashes, see --help)"
            )
        if value is None:
            continue  # the flag's default; every default that None could mean is None already
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, list | dict) for v in value)
        ):
            raise UserError(
                f"config file {path}: {key} must be a single value or a list of strings, got "
                f"{value!r}"
            )
        if isinstance(value, list):
            if value:
                argv += [f"--{key}", *map(str, value)]
            continue
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv
