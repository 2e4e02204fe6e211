"""Run configuration: one dataclass per entry point, filled from defaults, a file and the command line.

    cfg = parse_config(SFTConfig, description=__doc__)

Values are applied in three layers, each overriding the one before:

    1. the dataclass defaults
    2. `--config run.toml` (or .json, read with tomllib or json): top-level keys are options,
       tables are nested dataclasses
    3. the command line, read by argparse with one option per field and no abbreviations:
       `--lr 3e-4`, `--lr=3e-4`; `--max-steps` and `--max_steps` are the same option; a nested
       dataclass field is `--optim.lr 1e-4`

argparse only collects the text given for each option; file and command-line values then go
through the same conversion, by the field's annotation:

    int, float, str, Path       `--steps 1000` (also `1e3`), `--lr 3e-4`, `--out runs/a`
    bool                        `--flag`, `--flag true|false` (yes/no, on/off, 1/0), `--no-flag`
    X | None                    the word `none` (or `null`) gives None
    Literal["a", "b"]           the value must be one of the choices
    list[X], tuple[X, ...]      `--layers 1,2,3`, or any TOML array `--stages "[[0, 1.0], [0.5, 0.7]]"`;
                                given again, a list with metadata {"repeat": True} grows instead
                                (`--reward-fn a.py:f --reward-fn b.py:g`; the first replaces the file's)
    dict[str, X]                a TOML table, or an inline one: `--weights "{accuracy = 1.0}"`
    a dataclass                 a group of options: `--optim.lr`, `[optim]` in TOML

Values are never run as code; bracketed values are read by tomllib. After the dataclass is
built, every `validate()` method it (or a nested dataclass) defines is called.

Mistakes, argparse's included, raise `ConfigError` naming the option: an unknown option lists
the close matches (`unknown option --lrr; did you mean --lr?`), a bad value says what was
expected (`--lr: expected float, got 'abc'`). `main_guard` turns it into a one-line message and
exit status 2, so a typo never prints a traceback. `--help` is argparse's, listing every option
with its help text (`field(metadata={"help": ...})`) and default.

`save_config` writes the resolved configuration into the run directory as config.json, which
`load_config_file` reads back, and as config.toml (by `to_toml`; TOML has no null, so None is
written "none"), ready for `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

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
    repeat: bool  # a list option whose command-line occurrences add up (metadata {"repeat": True})


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_path(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, PurePath)


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


def _options(cls: type) -> tuple[dict[str, _Option], set[str]]:
    """Every field of `cls` and its nested dataclasses, keyed by dotted path; and the groups' paths."""
    if not _is_group(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    options: dict[str, _Option] = {}
    groups: set[str] = set()

    def collect(cls: type, prefix: str, defaults: Any) -> None:  # defaults: the instance whose values show
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if not prefix and f.name in RESERVED:
                raise TypeError(f"{cls.__name__}: a field may not be named {f.name!r} (it is --{f.name})")
            key, tp = prefix + f.name, hints[f.name]
            default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
            if _is_group(tp):
                groups.add(key)
                collect(tp, key + ".", None if default is dataclasses.MISSING else default)
            else:
                options[key] = _Option(key, tp, default, f.metadata.get("help", ""), f.metadata.get("repeat", False))

    collect(cls, "", None)
    return options, groups


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _is_boolish(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) in (Union, types.UnionType) and bool in typing.get_args(tp))


# -- converting values ------------------------------------------------------------------------------


class _Mismatch(Exception):
    """The value does not fit the type (message filled in by the caller, who knows the option)."""


def _describe(tp: Any) -> tuple[str, str]:
    """How an error names a type and how --help shows its value: ("int or none", "INT|none")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        names, shown = zip(*(_describe(a) for a in args if a is not type(None)))
        none = type(None) in args
        return " or ".join(names) + " or none" * none, "|".join(shown) + "|none" * none
    if origin is Literal:
        return "one of " + ", ".join(map(str, args)), "{" + ",".join(map(str, args)) + "}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        names, shown = zip(*map(_describe, args))
        return f"{len(args)} values ({', '.join(names)})", ",".join(shown)
    if origin in (list, tuple) or tp in (list, tuple):
        name, item = _describe(args[0]) if args else ("", "VALUE")
        name = f"list{' of ' + name if args else ''} (comma-separated or a TOML array)"
        return name, "TOML-ARRAY" if args and typing.get_origin(args[0]) in (list, tuple, dict) else item + ",..."
    if origin is dict or tp is dict:
        return "table (TOML, e.g. {a = 1})", "TABLE"
    if _is_path(tp):
        return "path", "PATH"
    return getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", "VALUE").upper()


def _read_toml_value(text: str) -> Any:
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
        return _to_union(value, args)
    if origin is Literal:
        return _to_choice(value, args)
    if tp is bool:
        return _to_bool(value)
    if tp in (int, float):
        return _to_number(value, tp)
    if tp is str or _is_path(tp):
        if isinstance(value, str) or (tp is not str and isinstance(value, PurePath)):
            return tp(value)
        raise _Mismatch()
    if origin in (list, tuple) or tp in (list, tuple):
        return _to_sequence(value, tuple if tuple in (origin, tp) else list, args)
    if origin is dict or tp is dict:
        return _to_table(value, args)
    raise TypeError(f"unsupported option type {tp!r}")


def _to_union(value: Any, args: tuple) -> Any:
    if type(None) in args and (value is None or isinstance(value, str) and value.lower() in NONE_WORDS):
        return None
    reasons = []
    for arm in (a for a in args if a is not type(None)):
        try:
            return _convert(value, arm)
        except _Mismatch as e:
            reasons.append(str(e))
    raise _Mismatch(next((r for r in reasons if r), ""))


def _to_choice(value: Any, choices: tuple) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
        if isinstance(value, str) and not isinstance(choice, str) and value == str(choice):
            return choice
    raise _Mismatch()


def _to_bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
        return value.lower() in TRUE_WORDS
    if isinstance(value, bool):
        return value
    raise _Mismatch()


def _to_number(value: Any, tp: type) -> int | float:
    if isinstance(value, str):
        try:
            value = tp(value)
        except ValueError:
            try:
                value = float(value)  # "1e4" is a fine way to write a step count
            except ValueError:
                raise _Mismatch() from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Mismatch()
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise _Mismatch()
    return tp(value)


def _to_sequence(value: Any, kind: type, args: tuple) -> list | tuple:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _read_toml_value(text)
        else:
            value = [item.strip() for item in text.split(",")] if text else []
    if not isinstance(value, (list, tuple)):
        raise _Mismatch()
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch(f"expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a) for v, a in zip(value, args))
    return kind(_convert(v, args[0]) if args else v for v in value)


def _to_table(value: Any, args: tuple) -> dict:
    if isinstance(value, str) and value.strip().startswith("{"):
        value = _read_toml_value(value)
    if not isinstance(value, dict):
        raise _Mismatch()
    if not args:
        return dict(value)
    return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}


def _coerce(value: Any, option: _Option, where: str) -> Any:
    try:
        return _convert(value, option.type)
    except _Mismatch as e:
        detail = f" ({e})" if str(e) else ""
        raise ConfigError(f"{where}: expected {_describe(option.type)[0]}, got {value!r}{detail}") from None


# -- config files -----------------------------------------------------------------------------------


def _unknown(shown: str, key: str, known: list[str], display: Callable[[str], str], where: str) -> ConfigError:
    scores = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in known}
    best = max(scores.values(), default=0.0)
    # Only the near-best matches: a shared "optim." prefix alone should not make a suggestion.
    close = sorted((k for k, s in scores.items() if s >= 0.6 and s >= best - 0.1), key=lambda k: -scores[k])[:3]
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
        data = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
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


# -- the command line: argparse ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, raising its mistakes as ConfigError instead of printing the usage and exiting."""

    def _parse_optional(self, arg_string: str) -> Any:
        # Every option here starts with "--", so any other word is a value, `--lr -1e-4` included
        # (argparse would take it for an option, as it does any "-" word but a plain negative number).
        return super()._parse_optional(arg_string) if arg_string.startswith("--") else None

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message.removeprefix("argument "))

    def exit(self, status: int = 0, message: str | None = None) -> typing.NoReturn:
        raise ConfigError((message or "").strip() or f"the option parser stopped (status {status})")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option once (`--max-steps INT`, `--compile, --no-compile`), not every spelling it
    accepts; lines are not wrapped, so a help text reads whole at any terminal width."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=1 << 16)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return action.shown  # every action here is a _Given


_NO_VALUE = object()  # argparse's `const` when an option is given without a value


class _Given(argparse.Action):
    """Notes (field, text, option as typed) in command-line order; `_resolve` converts the texts
    after parsing, by the same rules as a file's values, so an unknown option is reported first.

    The value is optional to argparse: a missing one is then reported naming the option as typed,
    and a bool can be `--flag`, `--flag false` or (one of `negations`) `--no-flag`."""

    def __init__(self, option_strings, dest, *, shown, expects, flag=False, negations=(), **kwargs):
        super().__init__(option_strings, dest, nargs="?", const=_NO_VALUE, default=argparse.SUPPRESS, **kwargs)
        self.shown, self.expects, self.flag, self.negations = shown, expects, flag, negations

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string in self.negations:
            if value is not _NO_VALUE:
                raise ConfigError(f"{option_string} takes no value, got {value!r}")
            value = False
        elif value is _NO_VALUE:
            if not self.flag:
                raise ConfigError(f"{option_string}: missing value (expected {self.expects})")
            value = True
        namespace.given.append((self.dest, value, option_string))


def _spellings(*names: str) -> list[str]:
    """`--max_steps` with dashes first (the one --help shows), then as written."""
    return list(dict.fromkeys([n.replace("_", "-") for n in names] + list(names)))


def _parser(options: dict[str, _Option], description: str = "", prog: str | None = None) -> _Parser:
    parser = _Parser(
        prog=prog or os.path.basename(sys.argv[0]) or "prog",
        usage="%(prog)s [--config FILE] [--option VALUE ...]",
        description=description.strip() or None,
        formatter_class=_HelpFormatter,
        add_help=False,  # --help is answered before parsing: it wins over any mistake beside it
        allow_abbrev=False,
    )
    parser.add_argument("--config", action=_Given, shown="--config FILE", expects="a .toml or .json file",
                        help="TOML or JSON file of options; command-line options override it")
    for opt in options.values():
        head, dot, last = opt.key.rpartition(".")
        flag, (expects, metavar) = _is_boolish(opt.type), _describe(opt.type)
        negations = _spellings("--no_" + opt.key, *([f"--{head}.no_{last}"] if dot else [])) if flag else []
        shown = f"{_flag(opt.key)}, {negations[0]}" if opt.type is bool else f"{_flag(opt.key)} {metavar}"
        default = f"({_show_default(opt.default)})"
        text = (f"{opt.help} {default}" if opt.help else default).replace("%", "%%")  # argparse formats it with %
        parser.add_argument(*_spellings("--" + opt.key), *negations, action=_Given, dest=opt.key, help=text,
                            shown=shown, expects=expects, flag=flag, negations=negations)
    return parser


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


def _not_an_option(arg: str, options: dict[str, _Option], groups: set[str]) -> ConfigError:
    """The error for the first word argparse could not place."""
    if not arg.startswith("--") or arg == "--":
        return ConfigError(f"unexpected argument {arg!r}; options are written --name value")
    name = arg[2:].partition("=")[0]
    key = name.replace("-", "_")
    if key in groups:
        fields = [_flag(k) for k in options if k.startswith(key + ".")]
        example = f", e.g. {fields[0]}" if fields else ""
        return ConfigError(f"--{name} is a group of options; set its fields{example}")
    return _unknown("--" + name, key, list(options), _flag, "")


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
        key, tp = prefix + f.name, hints[f.name]
        if not f.init:
            continue
        if _is_group(tp):
            inner = getattr(base, f.name) if base is not None else _field_default(f)
            if inner is dataclasses.MISSING or any(k.startswith(key + ".") for k in values):
                kwargs[f.name] = _build(tp, values, key + ".", None if inner is dataclasses.MISSING else inner)
        elif key in values:
            kwargs[f.name] = values[key]
        elif base is None and _field_default(f) is dataclasses.MISSING:
            raise ConfigError(f"missing required option {_flag(key)} ({_describe(tp)[0]})")
    try:
        if base is None or base == _fresh(cls):
            # From the overrides alone, so that values __post_init__ derives from other fields
            # (e.g. head_dim from hidden_size) are derived again.
            return cls(**kwargs)
        return dataclasses.replace(base, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


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
    """Defaults < each file in turn < the command line's (field, text, option as typed), in order."""
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
    given, extra = _parser(options).parse_known_args(argv, argparse.Namespace(given=[]))
    if extra:
        raise _not_an_option(extra[0], options, groups)
    files = [value for key, value, _ in given.given if key == "config"]
    return _resolve(cls, files, [g for g in given.given if g[0] != "config"])


def format_help(cls: type, *, description: str = "", prog: str | None = None) -> str:
    """The --help text: usage, description, then every option with its help and default."""
    return _parser(_options(cls)[0], description, prog).format_help().rstrip("\n")


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
    never arrive. (Here rather than in distributed.py, which builds on this module.)

    The run's models are freed first. A model wrapped for FSDP2 sits in reference cycles, so it
    would otherwise live until the interpreter shuts down, holding the group and gloo's pending
    work; freeing those then, with the interpreter half gone, can abort the process after a run
    that finished."""
    import gc

    import torch.distributed as dist  # only under torchrun: parsing options never loads torch

    if dist.is_initialized():
        if clean:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


# -- writing the resolved config --------------------------------------------------------------------


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
    texts = {".json": json.dumps(data, indent=2) + "\n", ".toml": to_toml(data)}
    if path.suffix in texts:
        files = {path: texts[path.suffix]}
    else:
        files = {path / "config.json": texts[".json"], path / "config.toml": texts[".toml"]}
    for file, text in files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, lambda tmp, text=text: Path(tmp).write_text(text))
    return next(iter(files))


def to_toml(data: Mapping[str, Any]) -> str:
    """A plain dict (str, int, float, bool, None, lists, dicts) as TOML: a non-empty dict value is a
    [table], one inside a list an inline table. TOML has no null, so None is written as the string
    "none", which every `X | None` option reads back as None."""
    lines = ["# Resolved configuration; use with --config. (none = unset: TOML has no null.)"]

    def table(data: Mapping[str, Any], name: str) -> None:
        tables = {k: v for k, v in data.items() if isinstance(v, Mapping) and v}
        lines.extend(f"{_toml_key(k)} = {_toml(v)}" for k, v in data.items() if k not in tables)
        for key, value in tables.items():  # after the plain keys: those would belong to the table
            full = f"{name}.{_toml_key(key)}" if name else _toml_key(key)
            lines.extend(["", f"[{full}]"])
            table(value, full)

    table(data, "")
    return "\n".join(lines) + "\n"


def _toml_key(key: Any) -> str:
    key = str(key)
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml(key)


def _toml(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # also for nan, inf and -inf, which TOML spells the same way
    if isinstance(value, str):
        # JSON escapes quotes, backslashes and control characters as TOML does; DEL and all past ASCII
        # are escaped here, as \U for characters past \uffff (JSON's surrogate pairs are not TOML).
        return "".join(c if c < "\x7f" else f"\\u{ord(c):04x}" if c <= "\uffff" else f"\\U{ord(c):08x}"
                       for c in json.dumps(value, ensure_ascii=False))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
