"""Run configuration: one dataclass per entry point, filled from defaults, a file and the command line.

    cfg = parse_config(SFTConfig, description=__doc__)

Values are applied in three layers, each overriding the one before:

    1. the dataclass defaults
    2. `--config run.toml` (or .json): top-level keys are options, tables are nested dataclasses
    3. command-line options: `--lr 3e-4`, `--lr=3e-4`; `--max-steps` and `--max_steps` are the
       same option; a nested dataclass field is `--optim.lr 1e-4`

Values are converted by the field's annotation:

    int, float, str, Path       `--steps 1000` (also `1e3`), `--lr 3e-4`, `--out runs/a`
    bool                        `--flag`, `--flag true|false` (yes/no, on/off, 1/0), `--no-flag`
    X | None                    the word `none` (or `null`) gives None
    Literal["a", "b"]           the value must be one of the choices
    list[X], tuple[X, ...]      `--layers 1,2,3`, or any TOML array `--stages "[[0, 1.0], [0.5, 0.7]]"`;
                                given again, a list with metadata {"repeat": True} grows instead
                                (`--reward-fn a.py:f --reward-fn b.py:g`; the first replaces the file's)
    dict[str, X]                a TOML table, or an inline one: `--weights "{accuracy = 1.0}"`
    a dataclass                 a group of options: `--optim.lr`, `[optim]` in TOML

Values are never run as code; bracketed values are read by the TOML parser. After the
dataclass is built, every `validate()` method it (or a nested dataclass) defines is called.

Mistakes raise `ConfigError` naming the option: an unknown option lists the close matches
(`unknown option --lrr; did you mean --lr?`), a bad value says what was expected
(`--lr: expected float, got 'abc'`). `main_guard` turns it into a one-line message and exit
status 2, so a typo never prints a traceback. `--help` lists every option with its help text
(`field(metadata={"help": ...})`) and default.

The resolved configuration goes into the run directory with `save_config` (config.json, which
`load_config_file` reads back, and the same values as config.toml, ready for `--config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

from .files import write_atomic

T = TypeVar("T")

NONE_WORDS = ("none", "null")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
RESERVED = ("config", "help")  # --config and --help belong to the parser


class ConfigError(ValueError):
    """A configuration mistake the user can fix: unknown option, bad value, failed validation."""


# -- the options a dataclass defines --------------------------------------------------------------


@dataclasses.dataclass
class _Option:
    key: str  # dotted field path: "optim.weight_decay"
    type: Any
    default: Any  # dataclasses.MISSING when the option is required
    help: str
    repeat: bool = False  # a list option whose command-line occurrences add up (metadata {"repeat": True})


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_hints(cls: type) -> dict[str, Any]:
    # Resolves string annotations (modules with `from __future__ import annotations`).
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"{cls.__name__}: cannot resolve a field annotation ({e})") from None
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _collect(cls: type, prefix: str, defaults: Any, options: dict[str, _Option], groups: set[str]) -> None:
    """Flatten `cls` into options keyed by dotted path; `defaults` is the instance whose values show."""
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if not prefix and f.name in RESERVED:
            raise TypeError(f"{cls.__name__}: a field may not be named {f.name!r} (it is --{f.name})")
        key = prefix + f.name
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if _is_group(tp):
            groups.add(key)
            inner = None if default is dataclasses.MISSING else default
            _collect(tp, key + ".", inner, options, groups)
        else:
            options[key] = _Option(key, tp, default, f.metadata.get("help", ""), f.metadata.get("repeat", False))


def _options(cls: type) -> tuple[dict[str, _Option], set[str]]:
    if not _is_group(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    options: dict[str, _Option] = {}
    groups: set[str] = set()
    _collect(cls, "", None, options, groups)
    return options, groups


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# -- converting values ------------------------------------------------------------------------------


class _Mismatch(Exception):
    """The value does not fit the type (message filled in by the caller, who knows the option)."""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in arms)
        return name + " or none" if len(arms) < len(args) else name
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} values ({', '.join(_type_name(a) for a in args)})"
        inner = f" of {_type_name(args[0])}" if args else ""
        return f"list{inner} (comma-separated or a TOML array)"
    if origin is dict or tp is dict:
        return "table (TOML, e.g. {a = 1})"
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "path"
    return getattr(tp, "__name__", str(tp))


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise _Mismatch(f"cannot read {text!r} as a TOML value ({e})") from None


def _convert(value: Any, tp: Any) -> Any:
    """`value` (a command-line string or a TOML/JSON value) as type `tp`, or raise _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in NONE_WORDS)
        if type(None) in args and is_none:
            return None
        reasons = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm)
            except _Mismatch as e:
                reasons.append(str(e))
        raise _Mismatch(next((r for r in reasons if r), ""))
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and not isinstance(choice, str) and value == str(choice):
                return choice
        raise _Mismatch()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise _Mismatch()
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    value = float(value)  # "1e4" is a fine way to write a step count
                except ValueError:
                    raise _Mismatch() from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch()
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch() from None
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch()
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _Mismatch()
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(value, tuple if tuple in (origin, tp) else list, args)
    if origin is dict or tp is dict:
        if isinstance(value, str) and value.strip().startswith("{"):
            value = _toml_value(value)
        if not isinstance(value, dict):
            raise _Mismatch()
        if not args:
            return dict(value)
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    raise TypeError(f"unsupported option type {tp!r}")


def _convert_sequence(value: Any, kind: type, args: tuple) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _toml_value(text)
        else:
            value = [item.strip() for item in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)):
        raise _Mismatch()
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch(f"expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a) for v, a in zip(value, args))
    items = [_convert(v, args[0]) if args else v for v in value]
    return kind(items)


def _coerce(value: Any, option: _Option, where: str) -> Any:
    try:
        return _convert(value, option.type)
    except _Mismatch as e:
        detail = f" ({e})" if str(e) else ""
        raise ConfigError(f"{where}: expected {_type_name(option.type)}, got {value!r}{detail}") from None


def _is_boolish(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) in (Union, types.UnionType) and bool in typing.get_args(tp))


# -- reading files and the command line -------------------------------------------------------------


def _unknown(
    shown: str, key: str, known: list[str], display: Callable[[str], str], where: str
) -> ConfigError:
    scores = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in known}
    best = max(scores.values(), default=0.0)
    # Only the near-best matches: a shared "optim." prefix alone should not make a suggestion.
    close = [k for k, s in scores.items() if s >= 0.6 and s >= best - 0.1]
    close = sorted(close, key=lambda k: -scores[k])[:3]
    last = key.rsplit(".", 1)[-1]
    same_name = [k for k in known if k.rsplit(".", 1)[-1] == last]  # the right field, wrong group
    close = same_name + [k for k in close if k not in same_name]
    hint = f"; did you mean {' or '.join(display(k) for k in close)}?" if close else " (see --help)"
    return ConfigError(f"{where}unknown option {shown}{hint}")


def _read_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be parsed ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options at the top level")
    return data


def _file_values(data: dict, options: dict[str, _Option], groups: set[str], source: str) -> dict[str, Any]:
    values: dict[str, Any] = {}

    def walk(table: dict, prefix: str) -> None:
        for name, value in table.items():
            key = prefix + str(name).replace("-", "_")
            if key in groups:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: {key} is a group of options; write it as a table [{key}]")
                walk(value, key + ".")
            elif key in options:
                values[key] = _coerce(value, options[key], f"{source}: {key}")
            else:
                raise _unknown(repr(key), key, list(options), repr, f"{source}: ")

    walk(data, "")
    return values


def _cli_values(
    argv: list[str], options: dict[str, _Option], groups: set[str]
) -> tuple[list[str], list[tuple[str, Any, str]]]:
    """Split argv into config files and (key, raw value, flag as typed) overrides, in order."""
    files: list[str] = []
    overrides: list[tuple[str, Any, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options are written --name value")
        name, has_value, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        shown = "--" + name
        nxt = argv[i] if i < len(argv) else None
        if key == "config":
            if not has_value:
                if nxt is None or nxt.startswith("--"):
                    raise ConfigError("--config: missing value (expected a .toml or .json file)")
                value, i = nxt, i + 1
            files.append(value)
            continue
        option = options.get(key)
        if option is None:
            # --no-flag; in a group, --no-optim.fused and --optim.no-fused both work
            head, dot, last = key.rpartition(".")
            base = None
            if key.startswith("no_"):
                base = key[3:]
            elif last.startswith("no_"):
                base = head + dot + last[3:]
            if base in options and _is_boolish(options[base].type) and not has_value:
                overrides.append((base, False, shown))
                continue
            if key in groups:
                fields = [_flag(k) for k in options if k.startswith(key + ".")]
                example = f", e.g. {fields[0]}" if fields else ""
                raise ConfigError(f"{shown} is a group of options; set its fields{example}")
            raise _unknown(shown, key, list(options), _flag, "")
        if not has_value:
            if _is_boolish(option.type):
                words = TRUE_WORDS + FALSE_WORDS + (NONE_WORDS if option.type is not bool else ())
                if nxt is not None and nxt.lower() in words:
                    value, i = nxt, i + 1
                else:
                    value = True  # a bare --flag
            elif nxt is None or nxt.startswith("--"):
                raise ConfigError(f"{shown}: missing value (expected {_type_name(option.type)})")
            else:
                value, i = nxt, i + 1
        overrides.append((key, value, shown))
    return files, overrides


# -- building the dataclass -------------------------------------------------------------------------


def _fresh(cls: type) -> Any:
    try:
        return cls()
    except Exception:  # required fields or a failing validate: there is no plain default
        return None


def _build(cls: type, values: dict[str, Any], prefix: str, base: Any) -> Any:
    """An instance of `cls` from `values` (dotted keys) on top of `base` (None: the class defaults)."""
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        tp = hints[f.name]
        if _is_group(tp):
            inner = getattr(base, f.name) if base is not None else _field_default(f)
            if inner is dataclasses.MISSING:
                kwargs[f.name] = _build(tp, values, key + ".", None)
            elif any(k.startswith(key + ".") for k in values):
                kwargs[f.name] = _build(tp, values, key + ".", inner)
            elif base is not None:
                kwargs[f.name] = inner
        elif key in values:
            kwargs[f.name] = values[key]
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
        elif _field_default(f) is dataclasses.MISSING:
            raise ConfigError(f"missing required option {_flag(key)} ({_type_name(tp)})")
    if base is not None and base == _fresh(cls):
        # The default is the plain class default: build from the overrides alone, so values that
        # __post_init__ derives from other fields (e.g. head_dim from hidden_size) are derived again.
        kwargs = {k: v for k, v in kwargs.items() if k in _overridden(cls, values, prefix)}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _overridden(cls: type, values: dict[str, Any], prefix: str) -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in values or any(k.startswith(key + ".") for k in values):
            names.add(f.name)
    return names


def _validate(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _validate(value, f"{where}.{f.name}" if where else f.name)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _resolve(cls: type[T], files: list[str | os.PathLike], overrides: list[tuple[str, Any, str]]) -> T:
    options, groups = _options(cls)
    values: dict[str, Any] = {}
    for path in files:
        values.update(_file_values(_read_file(path), options, groups, str(path)))
    repeated: set[str] = set()
    for key, raw, shown in overrides:
        value = _coerce(raw, options[key], shown)
        if key in repeated:  # --reward-fn a.py:f --reward-fn b.py:g: both
            value = [*values[key], *value]
        if options[key].repeat:
            repeated.add(key)
        values[key] = value
    cfg = _build(cls, values, "", None)
    _validate(cfg, "")
    return cfg


# -- public API -------------------------------------------------------------------------------------


def parse_config(cls: type[T], argv: list[str] | None = None, *, description: str = "") -> T:
    """Build a `cls` from its defaults, `--config FILE`, then command-line overrides.

    argv defaults to sys.argv[1:]. Raises ConfigError on any mistake (wrap the script's main in
    `main_guard` for a one-line message); `--help` prints the options and exits with status 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(format_help(cls, description=description))
        raise SystemExit(0)
    options, groups = _options(cls)
    files, overrides = _cli_values(argv, options, groups)
    return _resolve(cls, files, overrides)


def require(*rules: tuple[str, Any, bool, str]) -> None:
    """Range checks for a `validate()`: each rule is (option as typed, value, ok, what it must be).

    The first rule that is not ok raises `ConfigError("--lr must be a finite number > 0, got 0.0")`.
    Write `ok` so that NaN fails it (`x > 0`, not `not x <= 0`).
    """
    for option, value, ok, must in rules:
        if not ok:
            raise ConfigError(f"{option} must be {must}, got {value}")


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def load_config_file(cls: type[T], path: str | os.PathLike) -> T:
    """A `cls` from its defaults and one TOML or JSON file (such as a run's saved config.json)."""
    return _resolve(cls, [path], [])


def main_guard(main: Callable[[], T]) -> T:
    """Run a script's main(); bad input becomes `error: <message>` on stderr and exit status 2.

    Bad input is a ValueError or a missing file: the library's errors for configs, data and
    checkpoints all are, and each names the file, line or field. NANOPOST_DEBUG=1 shows the
    traceback instead.

    Under torchrun the message names the rank, and any error is also recorded for torchrun's
    end-of-job summary (which then shows the failing rank's traceback, not only its exit code).
    """
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if rank is not None:
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("NANOPOST_DEBUG"):
            raise
        print(f"error{'' if rank is None else f' (rank {rank})'}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if rank is not None:
            _leave_process_group(clean=sys.exc_info()[0] is None)


def _leave_process_group(clean: bool) -> None:
    """Leave the torchrun process group `distributed.setup` joined. After a normal end (clean) ranks
    first wait for each other: a peer that closes its connections early can abort one still
    finishing its last collective. After an error there is no waiting, since the other ranks may
    never arrive. (Here rather than in distributed.py, which builds on this module.)"""
    import torch.distributed as dist  # only under torchrun: parsing options never loads torch

    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON values: nested dataclasses become dicts, paths strings, tuples lists."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config; returns the JSON file's path.

    `path` ending in .json or .toml names that one file. Anything else is the run directory, which
    gets both config.json (read back by `load_config_file`) and config.toml (usable as --config).
    """
    path = Path(path)
    data = config_to_dict(cfg)
    as_json = json.dumps(data, indent=2) + "\n"
    if path.suffix in (".json", ".toml"):
        path.parent.mkdir(parents=True, exist_ok=True)
        text = as_json if path.suffix == ".json" else to_toml(data)
        write_atomic(path, lambda f: Path(f).write_text(text))
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "config.json", lambda f: Path(f).write_text(as_json))
    write_atomic(path / "config.toml", lambda f: Path(f).write_text(to_toml(data)))
    return path / "config.json"


def to_toml(data: Mapping[str, Any]) -> str:
    """A plain dict as TOML. TOML has no null, so None is written as the string "none", which every
    `X | None` option reads back as None."""
    lines = ["# Resolved configuration; use with --config. (none = unset: TOML has no null.)"]
    _toml_table(data, [], lines)
    return "\n".join(lines) + "\n"


def _toml_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping) and v and _all_tables_ok(v)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{_toml_key(key)} = {_toml_scalar(value)}")
    for key, value in tables.items():
        lines.append("")
        lines.append("[" + ".".join(_toml_key(k) for k in [*path, key]) + "]")
        _toml_table(value, [*path, key], lines)


def _all_tables_ok(table: Mapping) -> bool:
    return all(isinstance(k, str) for k in table)


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_string(key)


def _toml_string(s: str) -> str:
    # JSON strings are valid TOML basic strings once DEL (allowed raw in JSON) is escaped too.
    return json.dumps(s, ensure_ascii=True).replace("\x7f", "\\u007f")


def _toml_scalar(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# -- help -------------------------------------------------------------------------------------------


def _metavar(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = [_metavar(a) for a in args if a is not type(None)]
        return "|".join(arms) + ("|none" if type(None) in args else "")
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return ",".join(_metavar(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        if args and typing.get_origin(args[0]) in (list, tuple, dict):
            return "TOML-ARRAY"
        return (_metavar(args[0]) if args else "VALUE") + ",..."
    if origin is dict or tp is dict:
        return "TABLE"
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "PATH"
    return getattr(tp, "__name__", "VALUE").upper()


def _show_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "default: none"
    if isinstance(value, (list, tuple)):
        return "default: " + (",".join(str(v) for v in value) if value else "empty")
    if isinstance(value, str):
        return f"default: {value!r}"
    return f"default: {value}"


def format_help(cls: type, *, description: str = "", prog: str | None = None) -> str:
    """The --help text: usage, description, then every option with its help and default."""
    options, _ = _options(cls)
    prog = prog or os.path.basename(sys.argv[0]) or "prog"
    rows = [("--config FILE", "TOML or JSON file of options; command-line options override it")]
    for opt in options.values():
        if opt.type is bool:
            left = f"{_flag(opt.key)}, --no-{_flag(opt.key)[2:]}"
        else:
            left = f"{_flag(opt.key)} {_metavar(opt.type)}"
        default = f"({_show_default(opt.default)})"
        text = f"{opt.help} {default}" if opt.help else default
        rows.append((left, text))
    width = min(max(len(left) for left, _ in rows), 32)
    out = [f"usage: {prog} [--config FILE] [--option VALUE ...]"]
    if description.strip():
        out += ["", description.strip()]
    out += ["", "options:"]
    for left, text in rows:
        if len(left) > width:
            out += [f"  {left}", f"  {'':{width}}  {text}"]
        else:
            out.append(f"  {left:{width}}  {text}")
    return "\n".join(out)
