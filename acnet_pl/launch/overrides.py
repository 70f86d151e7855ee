"""The pre-check of Hydra command-line overrides: a config mistake becomes one line with the fix.

Root scripts call `check_overrides` before `hydra.main`, whose own message for the same mistakes is many
lines. Hydra internals relied on (hydra-core 1.3, pinned in pyproject.toml; tests/test_launch.py fails
when they change):
- `hydra._internal.utils.get_args_parser()` (private): the parser `hydra.main` reads the command line
  with; its dests `overrides`, `multirun`, `run`, `cfg`, `info`, `shell_completion`, `config_name`,
  `config_path`, `config_dir`, `help`, `hydra_help`, `experimental_rerun`.
- The texts of Hydra's composition errors, read to name the key that failed: "Could not override 'k'.
  To append to your config use +k=v", "An item is already at 'k'", "Multiple values for g.";
  `MissingConfigException.options` / `.missing_cfg_file`.
Public API otherwise: the compose API, `OverridesParser`, `ConfigLoader.get_group_options`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

#: Flags after which Hydra does something other than compose this config from this dir: left to Hydra.
_FLAGS_LEFT_TO_HYDRA = (
    "help",
    "hydra_help",
    "info",
    "shell_completion",
    "experimental_rerun",
    "config_path",
    "config_dir",
)
_GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"

# The texts of Hydra's composition errors that name the key at fault (tests/test_launch.py pins them).
#: A key the config does not have (its cause an OmegaConf ConfigKeyError/ConfigAttributeError).
HYDRA_UNKNOWN_KEY = r"Could not override '([^']+)'\.\s*To append to your config use (\S+)"
#: Any override that failed: the key is group 1.
HYDRA_OVERRIDE_FAILED = r"Could not override '([^']+)'"
#: `+key=value` for a key that is already in the config.
HYDRA_KEY_ALREADY_THERE = r"An item is already at '([^']+)'"
#: `+group=option` for a config group that already has a choice.
HYDRA_GROUP_ALREADY_CHOSEN = r"Multiple values for (\S+)\."


class _ArgvNotUnderstood(Exception):
    """argparse could not read the command line: Hydra will say why."""


def _raise_argv_error(message: str) -> None:
    raise _ArgvNotUnderstood(message)


def _parse_hydra_argv(argv: Sequence[str]) -> Any | None:
    """Hydra's own reading of `argv` (flags + overrides), or None when Hydra should handle it alone."""
    if "--version" in argv:
        return None
    parser = get_args_parser()
    parser.error = _raise_argv_error  # type: ignore[method-assign]
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except (_ArgvNotUnderstood, SystemExit):
        return None
    modes = [flag for flag in ("run", "multirun", "cfg", "info", "shell_completion") if getattr(args, flag)]
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback for this
        given = " and ".join("--" + flag.replace("_", "-") for flag in modes)
        raise ValueError(f"{given} do not go together; give one of --run, --multirun, --cfg, --info")
    if unknown or any(getattr(args, flag, None) for flag in _FLAGS_LEFT_TO_HYDRA):
        return None
    return args


def _one_line(text: str) -> str:
    """Hydra's multi-line message as one line, without the config search path it appends."""
    lines = []
    for line in str(text).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(("See https://hydra.cc", "full_key:", "object_type=")):
            lines.append(line)
    return " ".join(lines)


def _group_location(config_dir: Path, group: str) -> str:
    return f"{config_dir.name}/{group}" if (config_dir / group).is_dir() else f"group {group}"


def _composition_message(
    error: BaseException,
    overrides: Sequence[Any],
    config_dir: Path,
    composed_config: Any = None,
    choices: Sequence[str] = (),
) -> str:
    """One line saying what is wrong with the overrides and how to fix it, from Hydra's composition error.

    `composed_config` (the config composed without the failing override) and `choices` (its config
    groups) give the "did you mean" of an unknown key.
    """
    text = str(error)
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        choices = ", ".join(error.options) or "(none)"
        where = _group_location(config_dir, group)
        if any(o.key_or_group == group for o in overrides):
            return f"{group}={name}: no such choice in {where}; choose one of: {choices}"
        return f"{_one_line(text.splitlines()[0])}: no such choice in {where}; choose one of: {choices}"
    missing_key = re.match(HYDRA_UNKNOWN_KEY, text)
    if missing_key and isinstance(error.__cause__, (ConfigKeyError, ConfigAttributeError)):
        key = missing_key.group(1)
        override = next((o for o in overrides if o.key_or_group == key), None)
        value = "..." if override is None else override.input_line.split("=", 1)[-1]  # a sweep's too
        return unknown_key_message(key, value, composed_config, choices)
    # A "+" on a key or group that already has a value: say so and show the override without it.
    for pattern, what in (
        (HYDRA_KEY_ALREADY_THERE, "is already in the config"),
        (HYDRA_GROUP_ALREADY_CHOSEN, "already has a choice"),
    ):
        found = re.search(pattern, text)
        if not found:
            continue
        key = found.group(1)
        for o in overrides:
            if o.key_or_group == key and o.is_add():
                value = o.get_value_element_as_str()
                return f"{o.input_line}: {key} {what}; drop the + ({key}={value})"
    message = _one_line(text)
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        message += f" ({_one_line(str(cause))})"
    return message


def _config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (lists are leaves)."""
    keys = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else ():
        full = f"{prefix}{key}"
        keys.append(full)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            keys += _config_keys(node, full + ".")
    return keys


def did_you_mean(key: str, cfg: Any, choices: Sequence[str] = ()) -> list[str]:
    """Keys of `cfg` (and config groups) close to a mistyped `key`: spelling, or the same name elsewhere."""
    keys = [k for k in _config_keys(cfg) if not k.startswith("hydra.") or key.startswith("hydra.")]
    keys += [group for group in choices if "/" not in group]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    for name in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.8):
        if by_leaf[name] not in close:
            close.append(by_leaf[name])
    return [k for k in close if k != key][:3]


#: Config nodes without a `_target_` whose keys are a function's arguments all the same (ACNetModule
#: calls it with them, so that checkpoints hold plain hyperparameters).
_ARGUMENTS_OF = {"block": "acnet_pl.reparam.convert"}

#: Keys renamed in conf/, old -> new: an old command line gets the new name in its one-line error.
RENAMED_KEYS = {
    "block.block": "block.name",
    "acb_gamma_init": "block.gamma_init",
    "acb_bare_convs": "block.bare_convs",
    "verify.max_rel_error": "verify.logit_rtol",  # deploy.py
}


def _constructor_of(cfg: Any, key: str) -> str | None:
    """The `_target_` (or function) that receives `key` as an argument (its parent node's), or None."""
    parent = key.rpartition(".")[0]
    if parent in _ARGUMENTS_OF:
        return _ARGUMENTS_OF[parent]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig) and "_target_" in node:
        return str(node._get_node("_target_")._value())
    return None


def unknown_key_message(key: str, value: str, cfg: Any, choices: Sequence[str] = ()) -> str:
    """One line for `key=value` naming a key the config does not have: what was meant, and when `+` helps.

    `+key=value` is suggested only where the new key reaches something that reads it (an argument of a
    `_target_`, e.g. `+trainer.overfit_batches=3`); anywhere else it would be accepted and ignored.
    """
    message = f"{key}={value}: no such key in the config"
    if key in RENAMED_KEYS:
        return f"{message}; did you mean {RENAMED_KEYS[key]}={value}? ({key} was renamed)"
    suggestions = did_you_mean(key, cfg, choices) if cfg is not None else []
    target = _constructor_of(cfg, key) if cfg is not None else None
    if suggestions:
        return message + "; did you mean " + " or ".join(f"{s}={value}" for s in suggestions) + "?"
    message += "; check the spelling (--cfg job prints the config)"
    if target is not None:
        message += f", or pass a new argument to {target} with +{key}={value}"
    return message


def _check_added_keys(overrides: Sequence[Any], cfg: Any, choices: Sequence[str]) -> None:
    """ValueError for `+key=value` that adds a key nothing reads (not an argument of a `_target_`)."""
    for override in overrides:
        key = override.key_or_group
        if not override.is_add() or key in choices or key.startswith("hydra.") or key == "hydra":
            continue
        if _constructor_of(cfg, key) is not None:
            continue
        reference = _without(cfg, key)
        if reference is None:
            continue
        suggestions = did_you_mean(key, reference, choices)
        hint = f"did you mean {' or '.join(suggestions)}?" if suggestions else "remove it"
        raise ValueError(
            f"{override.input_line}: nothing reads {key} (a new key outside any _target_); {hint}"
        )


def _without(cfg: Any, key: str) -> Any:
    """A copy of `cfg` without `key` (so the key itself is not suggested), or None when it is not there."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(copy, parent_key) if parent_key else copy
    if parent is None or leaf not in parent:
        return None
    with open_dict(parent):
        del parent[leaf]
    return copy


def _sweep_values(override: Any) -> list[str] | None:
    """The values a discrete sweep override (a,b / choice / range / glob) stands for; None if not enumerable."""
    if not override.is_discrete_sweep():
        return None
    try:
        return list(override.sweep_string_iterator()) or None
    except Exception:  # a glob Hydra cannot expand here: left to the sweeper
        return None


def _reference_config(
    config_name: str, composed: Sequence[str], error: BaseException
) -> tuple[Any, list[str]]:
    """The config composed without the override that failed (for "did you mean"), and its config groups."""
    found = re.match(HYDRA_OVERRIDE_FAILED, str(error))
    if not found:
        return None, []
    bad = found.group(1)
    rest = [text for text in composed if text.split("=", 1)[0].lstrip("+~") != bad]
    try:
        cfg = compose(config_name, overrides=rest, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - another mistake: the message goes without suggestions
        return None, []
    return cfg, list(cfg.hydra.runtime.choices)


def check_overrides(
    config_name: str, config_dir: str | os.PathLike, argv: Sequence[str] | None = None
) -> None:
    """ValueError (one line, with the fix) when Hydra could not compose `config_name` with `argv`'s overrides.

    Root scripts call it before `hydra.main`, whose own message for the same mistakes is many lines.
    It composes the config once with Hydra's compose API from `config_dir` (about 0.2 s).
    Sweeps (`-m block=base,acb seed=0,1,2`) are composed with the first value of each, and every
    value of a config group sweep must be a choice of that group. Left to Hydra: `--help`, `--info`,
    `--version`, `--config-path/--config-dir`, flags it does not know, DDP child ranks (LOCAL_RANK > 0,
    started with the overrides of a checked job) and HYDRA_FULL_ERROR=1 (Hydra's full message).
    """
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    args = _parse_hydra_argv(argv)
    if args is None or not args.overrides:
        return

    config_dir = Path(config_dir).resolve()
    config_name = args.config_name or config_name
    if GlobalHydra.instance().is_initialized():
        return  # inside another Hydra app or compose context: nothing to pre-check
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        overrides, composed, sweeps = [], [], []
        for text in args.overrides:
            try:
                override = parser.parse_overrides([text])[0]
            except HydraException as error:
                lines = [line.strip() for line in str(error).splitlines()] + ["bad syntax"]
                if lines[0].startswith("Error parsing override"):
                    detail = lines[1]
                elif lines[0].startswith("LexerNoViableAltException"):
                    detail = "a character the grammar does not accept"
                else:
                    detail = lines[0]
                raise ValueError(
                    f"cannot read the override {text!r}: {detail}; write key=value ({_GRAMMAR_URL})"
                ) from None
            overrides.append(override)
            if not override.is_sweep_override():
                composed.append(text)
                continue
            values = _sweep_values(override)
            if values is not None:  # else an interval or tag sweep: only a sweeper can pick a value
                sweeps.append((override, values))
                composed.append(f"{override.get_key_element()}={values[0]}")
        try:
            cfg = compose(config_name, overrides=composed, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            reference, groups = _reference_config(config_name, composed, error)
            raise ValueError(_composition_message(error, overrides, config_dir, reference, groups)) from None
        except Exception:  # anything else is not a config mistake: hydra.main reports it as it will
            return
        _check_added_keys(overrides, cfg, list(cfg.hydra.runtime.choices))
        sweep = next((o for o in overrides if o.is_sweep_override()), None)
        if sweep is not None and not args.multirun and cfg.hydra.mode != RunMode.MULTIRUN:
            raise ValueError(
                f"{sweep.input_line} is a sweep: add -m (--multirun) to run one job per value, "
                f"or write {sweep.get_key_element()}=[...] for a list"
            )
        choices = cfg.hydra.runtime.choices
        for override, values in sweeps:
            group = override.key_or_group
            if group not in choices:
                continue
            options = loader.get_group_options(group, config_name=config_name, overrides=composed)
            for value in values[1:]:
                if value not in options:
                    raise ValueError(
                        f"{override.input_line}: no such choice {value!r} in {_group_location(config_dir, group)}; "
                        f"choose one of: {', '.join(options)}"
                    )
