"""Config parsing: YAML files whose keys are the config dataclasses' field names, plus CLI overrides.

    dftlite train --config configs/smollm2-135m_gsm8k_dft2_cpu.yaml --learning_rate 1e-4

Parsing is TRL's `TrlParser` (itself transformers' `HfArgumentParser`). What we add: unknown
YAML keys and values of the wrong type are errors that list the valid keys, and the resolved
config is saved next to every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dftlite.outputs import make_dir, write_text_atomic


class ConfigError(ValueError):
    """A config file or override that does not match the config dataclasses."""


# TrainingArguments fields a dftlite user does not set: left out of `--help` and of the valid-key lists.
# hub_token is refused (it would be saved with the run; HF_TOKEN is the way); remove_unused_columns must
# stay false; gradient_checkpointing_kwargs is a deprecated alias; local_rank is the launcher's;
# do_train/do_eval/do_predict are not read by the Trainer.
NOT_FOR_USERS = frozenset({"hub_token", "remove_unused_columns", "gradient_checkpointing_kwargs", "local_rank",
                           "do_train", "do_eval", "do_predict"})


def _did_you_mean(name: str, candidates) -> str | None:
    """The nearest valid name to a mistyped one (difflib's ratio >= 0.6), or None."""
    matches = difflib.get_close_matches(name, [c for c in candidates if c not in NOT_FOR_USERS], n=1, cutoff=0.6)
    return matches[0] if matches else None


def _unknown_message(unknown: list[str], fields, shared, prefix: str = "") -> str:
    """'did you mean' for each unknown name; names of another dftlite command say so."""
    hints = []
    for name in unknown:
        if name in shared:
            hints.append(f"{prefix}{name} is a {shared[name][0].__name__} setting, for another dftlite command")
        else:
            guess = _did_you_mean(name, [*fields, *shared])
            hints.append(f"did you mean {prefix}{guess} (not {prefix}{name})?" if guess else f"{prefix}{name}: no similar key")
    return "; ".join(hints)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Does a YAML value fit a dataclass field annotation? Lenient where argparse would convert."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in [m.value for m in annotation] or isinstance(value, annotation)
    return True  # types we do not check are left to the dataclass's own validation


def _fields(dataclass_types) -> dict[str, tuple[type, dataclasses.Field]]:
    found = {}
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for f in dataclasses.fields(dataclass_type):
            if f.init:
                found[f.name] = (dataclass_type, hints.get(f.name, Any))
    return found


def check_yaml(path: str | Path, dataclass_types, shared_types=()) -> dict:
    """Load a YAML config, check its keys and value types, return the keys for `dataclass_types`.

    Keys of `shared_types` (the other dftlite commands' configs) are allowed and dropped, so one
    recipe file can drive `sample`, `train` and `eval`; any other key is an error.
    """
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config file must hold a YAML mapping, got {type(config).__name__}")
    fields = _fields(dataclass_types)
    shared = {k: v for k, v in _fields(shared_types).items() if k not in fields}
    unknown = sorted(k for k in config if k not in fields and k not in shared and k != "env")
    if unknown:
        valid = ", ".join(sorted(k for k in fields if k not in NOT_FOR_USERS))
        raise ConfigError(f"{path}: unknown key(s) {unknown}: {_unknown_message(unknown, fields, {})}. Valid keys: {valid}")
    for key, value in config.items():
        if key == "env":
            continue
        owner, annotation = fields.get(key) or shared[key]
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"{path}: key {key!r} of {owner.__name__} expects {annotation}, got {value!r} ({type(value).__name__})"
            )
    return {k: v for k, v in config.items() if k in fields or k == "env"}


def parse_args(dataclass_types, argv: list[str] | None, prog: str | None = None, shared_types=()) -> tuple:
    """Parse `--config file.yaml` and command-line overrides into instances of `dataclass_types`.

    This is what TRL's `TrlParser.parse_args_and_config` does, with the key and type checks above.
    """
    from trl import TrlParser

    argv = list(argv or [])
    # allow_abbrev=False: `--max_example 4` is an error with a suggestion, not a silent --max_examples
    parser = TrlParser(dataclass_types, prog=prog, allow_abbrev=False)
    for action in parser._actions:
        if action.dest in NOT_FOR_USERS:
            action.help = argparse.SUPPRESS  # still parsed (hub_token gets its own error), not advertised
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        config = check_yaml(argv[index + 1], dataclass_types, shared_types)
        del argv[index : index + 2]
        for key, value in (config.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        parser.set_defaults_with_config(**config)
    # Unknown options first: a typo must not be hidden behind a config's own error (a required field)
    _, remaining = parser.parse_known_args(args=argv)
    if remaining:
        options = [arg.split("=", 1)[0] for arg in remaining if arg.startswith("--")]
        if not options:
            raise ConfigError(f"unexpected argument(s) {remaining}: every value follows its --field")
        fields = _fields(dataclass_types)
        shared = {k: v for k, v in _fields(shared_types).items() if k not in fields}
        names = [option[2:].replace("-", "_") for option in options]
        help_hint = f" `{prog} --help` lists the options." if prog else ""
        raise ConfigError(f"unknown option(s) {options}: {_unknown_message(names, fields, shared, '--')}.{help_hint}")
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv))
    except ValueError as err:
        # Dataclass __post_init__ validation: keep the message, mark it as a config error.
        raise ConfigError(str(err)) from err


def to_dict(*configs) -> dict:
    """The resolved configs as one flat, YAML-safe mapping (for saving and model cards)."""
    merged: dict[str, Any] = {}
    for config in configs:
        if hasattr(config, "to_dict"):  # TrainingArguments: drops tokens and non-serialisable values
            values = config.to_dict()
        else:
            values = dataclasses.asdict(config)
        for key, value in values.items():
            if (key == "token" or key.endswith("_token")) and key != "pad_token":
                continue  # never persist Hub tokens (hub_token, ...); max_new_tokens, token_budget stay
            merged[key] = value
    # Round-trip through JSON turns enums and paths into plain strings.
    return json.loads(json.dumps(merged, default=str))


def save_resolved_config(output_dir: str | Path, *configs, name: str = "dftlite_config.yaml") -> Path:
    path = make_dir(output_dir, "output directory") / name
    write_text_atomic(path, yaml.safe_dump(to_dict(*configs), sort_keys=True))
    return path
