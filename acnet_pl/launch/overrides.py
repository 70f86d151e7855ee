"""Command-line override mistakes as one line with the fix ("did you mean"), not Hydra's many.

Relied on (hydra-core 1.3; tests/test_launch.py fails when they change): the private `get_args_parser()`
(how `hydra.main` reads argv), the texts FAILED and ALREADY, MissingConfigException's options and file.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

#: Flags after which Hydra does something other than compose this config from this dir: left to Hydra.
LEFT_TO_HYDRA = "help hydra_help info shell_completion experimental_rerun config_path config_dir".split()  # noqa: SIM905
#: Hydra's text for an override that failed (an unknown key when caused by a ConfigKeyError): the key.
FAILED = r"Could not override '([^']+)'"
#: Hydra's texts for a `+` on a key / a config group that already has a value: the key or group.
ALREADY = r"An item is already at '([^']+)'|Multiple values for (\S+)\."
#: Keys renamed in conf/, old -> new: an old command line gets the new name in its one-line error.
RENAMED_KEYS = {
    "block.block": "block.name",
    "acb_gamma_init": "block.gamma_init",
    "acb_bare_convs": "block.bare_convs",
    "verify.max_rel_error": "verify.logit_rtol",  # deploy.py
}
#: Config nodes without a `_target_` whose keys are a function's arguments all the same.
ARGUMENTS_OF = {"block": "acnet_pl.reparam.convert"}


def parse_argv(argv: Sequence[str]) -> Any | None:
    """Hydra's own reading of `argv` (flags + overrides), or None when Hydra should handle it alone."""
    parser = get_args_parser()
    parser.exit_on_error = False  # a flag argparse cannot read: Hydra will say what is wrong
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except ArgumentError:
        return None
    modes = [flag for flag in ("multirun", "run", "cfg", "info", "shell_completion") if getattr(args, flag)]
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback for this
        given = " and ".join("--" + m.replace("_", "-") for m in modes)
        raise ValueError(f"{given} do not go together; give one of --run, --multirun, --cfg, --info")
    skip = unknown or "--version" in argv or any(getattr(args, flag) for flag in LEFT_TO_HYDRA)
    return None if skip else args


def _keys(node: Any, prefix: str = "") -> list[str]:
    items = node.items() if isinstance(node, dict) else ()
    return [k for key, value in items for k in [prefix + key, *_keys(value, f"{prefix}{key}.")]]


def did_you_mean(key: str, cfg: DictConfig) -> list[str]:
    """Keys and config groups of `cfg` close to a mistyped `key`: spelling, or the same name elsewhere."""
    keys = [k for k in _keys(OmegaConf.to_container(cfg)) if key.startswith("hydra") or k[:5] != "hydra"]
    keys += [group for group in cfg.hydra.runtime.choices if "/" not in group]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close += [by_leaf[n] for n in difflib.get_close_matches(key.rsplit(".", 1)[-1], by_leaf, n=3, cutoff=0.8)]
    return [k for k in dict.fromkeys(close) if k != key][:3]


def _reader_of(cfg: DictConfig, key: str) -> str | None:
    """The `_target_` (or function) that takes `key` as an argument, or None."""
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return ARGUMENTS_OF.get(parent, node.get("_target_") if isinstance(node, DictConfig) else None)


def _bad_key(override: Any, cfg: DictConfig) -> str:
    """One line for an override of a key that is not in `cfg` (or a `+` that nothing reads)."""
    key, value, renamed = override.key_or_group, override.input_line.split("=", 1)[-1], ""
    if override.is_add():
        close = did_you_mean(key, cfg)
        hint = f"did you mean {' or '.join(close)}?" if close else "remove it"
        return f"{override.input_line}: nothing reads {key} (a new key outside any _target_); {hint}"
    close = did_you_mean(key, cfg) if key not in RENAMED_KEYS else [RENAMED_KEYS[key]]
    if close:
        renamed = f" ({key} was renamed)" if key in RENAMED_KEYS else ""
        close = [f"{k}={value}" for k in close]
        return f"{key}={value}: no such key in the config; did you mean {' or '.join(close)}?{renamed}"
    reader = _reader_of(cfg, key)
    hint = f", or pass a new argument to {reader} with +{key}={value}" if reader else ""
    return f"{key}={value}: no such key in the config; check the spelling (--cfg job prints the config){hint}"


def _no_choice(what: str, group: str, name: str, options: Sequence[str], config_dir: Path) -> str:
    """`what` in conf/<group>, the choices there and the closest one."""
    where = f"{config_dir.name}/{group}" if (config_dir / group).is_dir() else f"group {group}"
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return f"{what} in {where}; choose one of: {', '.join(options) or '(none)'}{hint}"


def _message(error: Exception, overrides: list[Any], config_dir: Path, bad_key: Callable[[Any], str]) -> str:
    """One line saying what is wrong with the overrides and how to fix it, from Hydra's composition error."""
    text = str(error)
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return _no_choice(f"{group}={name}: no such choice", group, name, error.options, config_dir)
    failed, already = re.match(FAILED, text), re.search(ALREADY, text)
    for o in overrides:
        if failed and o.key_or_group == failed.group(1):
            if isinstance(error.__cause__, (ConfigKeyError, ConfigAttributeError)):
                return bad_key(o)
        elif already and o.key_or_group == (already.group(1) or already.group(2)) and o.is_add():
            what = "is already in the config" if already.group(1) else "already has a choice"
            return f"{o.input_line}: {o.key_or_group} {what}; drop the + ({o.input_line[1:]})"
    cause = f" ({error.__cause__})" if str(error.__cause__ or "").strip() else ""
    return " ".join((text.split("Config search path")[0] + cause).split())  # Hydra's own words, one line


def check_overrides(config_name: str, config_dir: str | Path, argv: Sequence[str] | None = None) -> None:
    """ValueError (one line, with the fix) when Hydra could not compose `config_name` with `argv`'s overrides.

    Sweeps are composed with their first value. Left to Hydra: LEFT_TO_HYDRA, `--version`, unknown flags,
    DDP child ranks (LOCAL_RANK > 0), HYDRA_FULL_ERROR=1 (Hydra's full message), calls inside a Hydra app.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    args = parse_argv(sys.argv[1:] if argv is None else argv)
    if args is None or not args.overrides or GlobalHydra.instance().is_initialized():
        return
    config_dir, config_name = Path(config_dir).resolve(), args.config_name or config_name
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        try:
            overrides = OverridesParser.create(config_loader=loader).parse_overrides(args.overrides)
        except OverrideParseException as error:  # Hydra's second line says what it could not read
            detail = (str(error).splitlines()[1:] or ["bad syntax"])[0].strip()
            url = "https://hydra.cc/docs/advanced/override_grammar/basic/"
            raise ValueError(
                f"cannot read the override {error.override!r}: {detail}; write key=value ({url})"
            ) from None
        composed, sweeps = [], []
        for o in overrides:  # an interval or tag sweep is left out: only a sweeper can pick its value
            values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
            sweeps += [(o, values)] if values else []
            if values or not o.is_sweep_override():
                composed.append(f"{o.get_key_element()}={values[0]}" if values else o.input_line)

        def bad_key(o: Any) -> str:  # compared with the config composed without it, for "did you mean"
            rest = [text for text in composed if text.split("=", 1)[0].lstrip("+~") != o.key_or_group]
            try:
                return _bad_key(o, compose(config_name, overrides=rest, return_hydra_config=True))
            except Exception:  # noqa: BLE001 - another mistake among the rest: the config as it ships
                return _bad_key(o, compose(config_name, return_hydra_config=True))

        try:
            cfg = compose(config_name, overrides=composed, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            raise ValueError(_message(error, overrides, config_dir, bad_key)) from None
        except Exception:  # not a config mistake: hydra.main reports it as it will
            return
        choices = cfg.hydra.runtime.choices
        for o in overrides:
            key = o.key_or_group
            if o.is_add() and key not in choices and not key.startswith("hydra") and not _reader_of(cfg, key):
                raise ValueError(bad_key(o))
        sweep = next((o for o in overrides if o.is_sweep_override()), None)
        if sweep is not None and not args.multirun and cfg.hydra.mode != RunMode.MULTIRUN:
            raise ValueError(
                f"{sweep.input_line} is a sweep: add -m (--multirun) to run one job per value, "
                f"or write {sweep.get_key_element()}=[...] for a list"
            )
        for o, values in sweeps:
            group = o.key_or_group
            if group not in choices:
                continue
            options = loader.get_group_options(group, config_name=config_name, overrides=composed)
            for value in (v for v in values[1:] if v not in options):
                raise ValueError(
                    _no_choice(f"{o.input_line}: no such choice {value!r}", group, value, options, config_dir)
                )
