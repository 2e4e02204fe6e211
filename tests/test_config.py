"""Config parsing: defaults < TOML file < command line, type conversion, and errors that name the option."""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from nanopost.plumbing.config import (
    ConfigError,
    config_to_dict,
    format_help,
    load_config_file,
    main_guard,
    parse_config,
    save_config,
)
from nanopost.model import ModelConfig


@dataclass
class Optim:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Train:
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    lr: float = 1e-5
    name: str = "run"
    out_dir: Path = Path("runs/x")
    compile: bool = False
    eval_every: int | None = 50
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    tags: list[str] = field(default_factory=list)
    stages: list[tuple[float, float]] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    optim: Optim = field(default_factory=Optim)

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclass
class FlagOptim:
    fused: bool = True


@dataclass
class WithFlags:
    optim: FlagOptim = field(default_factory=FlagOptim)


def test_defaults_without_arguments():
    assert parse_config(Train, []) == Train()


def test_command_line_overrides_with_space_equals_dashes_and_underscores():
    cfg = parse_config(Train, ["--max-steps", "7", "--lr=3e-4", "--eval_every", "5", "--name", "a b"])
    assert (cfg.max_steps, cfg.lr, cfg.eval_every, cfg.name) == (7, 3e-4, 5, "a b")
    assert parse_config(Train, ["--max_steps=1e3"]).max_steps == 1000


def test_bool_flag_forms():
    assert parse_config(Train, ["--compile"]).compile is True
    assert parse_config(Train, ["--compile", "false"]).compile is False
    assert parse_config(Train, ["--compile=yes"]).compile is True
    assert parse_config(Train, ["--compile", "--no-compile"]).compile is False
    assert parse_config(WithFlags, ["--no-optim.fused"]).optim.fused is False
    assert parse_config(WithFlags, ["--optim.no-fused"]).optim.fused is False
    # a bare flag does not swallow the next option
    cfg = parse_config(Train, ["--compile", "--max-steps", "3"])
    assert cfg.compile is True and cfg.max_steps == 3


def test_none_literal_path_and_negative_numbers():
    cfg = parse_config(Train, ["--eval-every", "none", "--schedule", "linear", "--out-dir", "runs/y",
                               "--optim.weight-decay", "-0.5"])
    assert cfg.eval_every is None and cfg.schedule == "linear"
    assert cfg.out_dir == Path("runs/y") and cfg.optim.weight_decay == -0.5


def test_lists_tuples_and_tables():
    cfg = parse_config(Train, ["--layers", "3, 4,5", "--tags", "a,b", "--optim.betas", "0.8,0.99",
                               "--stages", "[[0, 1.0], [0.5, 0.7]]", "--weights", "{accuracy = 1, format = 0.2}"])
    assert cfg.layers == [3, 4, 5] and cfg.tags == ["a", "b"] and cfg.optim.betas == (0.8, 0.99)
    assert cfg.stages == [(0.0, 1.0), (0.5, 0.7)]
    assert cfg.weights == {"accuracy": 1.0, "format": 0.2}
    assert parse_config(Train, ["--tags="]).tags == []


def test_toml_file_then_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(textwrap.dedent("""
        max_steps = 20
        lr = 2e-5
        layers = [7]
        eval_every = "none"
        [optim]
        lr = 1e-3
        betas = [0.5, 0.6]
    """))
    cfg = parse_config(Train, ["--config", str(toml), "--lr", "9e-5"])
    assert cfg.max_steps == 20 and cfg.lr == 9e-5  # the command line wins over the file
    assert cfg.layers == [7] and cfg.eval_every is None
    assert cfg.optim == Optim(lr=1e-3, betas=(0.5, 0.6))


def test_unknown_option_suggests_close_matches(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option --lrr; did you mean --lr"):
        parse_config(Train, ["--lrr", "1"])
    with pytest.raises(ConfigError, match=r"did you mean --optim\.weight-decay\?"):
        parse_config(Train, ["--optim.weight-dacay", "1"])
    with pytest.raises(ConfigError, match=r"did you mean --optim\.betas"):  # the field, in its group
        parse_config(Train, ["--betas", "1,2"])
    toml = tmp_path / "bad.toml"
    toml.write_text("[optim]\nlrr = 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown option 'optim\.lrr'; did you mean 'optim\.lr'"):
        parse_config(Train, ["--config", str(toml)])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], r"--lr: expected float, got 'abc'"),
    (["--max-steps", "1.5"], r"--max-steps: expected int, got '1.5'"),
    (["--schedule", "step"], r"--schedule: expected one of cosine, linear, constant, got 'step'"),
    (["--compile=maybe"], r"--compile: expected bool"),
    (["--optim.betas", "1,2,3"], r"--optim.betas: expected 2 values"),
    (["--eval-every", "x"], r"--eval-every: expected int or none"),
    (["--lr"], r"--lr: missing value"),
    (["stray"], r"unexpected argument 'stray'"),
    (["--optim", "1"], r"--optim is a group of options; set its fields, e.g. --optim.lr"),
    (["--max-steps", "0"], r"max_steps must be >= 1"),
])
def test_bad_values_name_the_option_and_type(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Train, argv)


def test_bad_toml_value_names_file_and_key(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = "ten"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: max_steps: expected int, got 'ten'"):
        parse_config(Train, ["--config", str(toml)])
    toml.write_text("optim = 3\n")
    with pytest.raises(ConfigError, match=r"optim is a group of options"):
        parse_config(Train, ["--config", str(toml)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(Train, ["--config", str(tmp_path / "missing.toml")])


def test_help_lists_every_option_with_help_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Train, ["--lr", "nonsense", "--help"], description="Train a thing.")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Train a thing." in text
    assert "--max-steps INT" in text and "optimizer steps (default: 100)" in text
    assert "--optim.lr FLOAT" in text and "peak learning rate (default: 0.0003)" in text
    assert "--compile, --no-compile" in text
    assert "--schedule {cosine,linear,constant}" in text
    assert "--eval-every INT|none" in text and "--optim.betas FLOAT,FLOAT" in text
    for option in ("--name", "--out-dir", "--layers", "--tags", "--stages", "--weights", "--optim.betas"):
        assert option in text


def test_saved_config_round_trips_through_json_and_toml(tmp_path):
    cfg = parse_config(Train, ["--eval-every", "none", "--optim.lr", "1e-3", "--name", 'say "hi"\n',
                               "--stages", "[[0, 1.0], [0.5, 0.7]]"])
    json_path = save_config(cfg, tmp_path)
    assert json_path == tmp_path / "config.json"
    data = json.loads(json_path.read_text())
    assert data == config_to_dict(cfg)
    assert data["optim"]["betas"] == [0.9, 0.95] and data["out_dir"] == "runs/x"
    assert load_config_file(Train, json_path) == cfg
    assert load_config_file(Train, tmp_path / "config.toml") == cfg
    assert parse_config(Train, ["--config", str(tmp_path / "config.toml")]) == cfg


def test_nested_default_derived_fields_are_recomputed():
    # ModelConfig derives head_dim from hidden_size in __post_init__: an override must re-derive it.
    @dataclass
    class WithModel:
        model: ModelConfig = field(default_factory=ModelConfig)

    cfg = parse_config(WithModel, ["--model.hidden-size", "64", "--model.num-attention-heads", "2",
                                   "--model.num-key-value-heads", "1"])
    assert cfg.model.head_dim == 32
    assert parse_config(WithModel, ["--model.eos-token-id", "1,2"]).model.eos_token_id == [1, 2]
    with pytest.raises(ConfigError, match="model: .*model_type 'gpt2' is not supported"):
        parse_config(WithModel, ["--model.model-type", "gpt2"])


def test_required_option():
    @dataclass
    class Needs:
        data: str
        steps: int = 1

    assert parse_config(Needs, ["--data", "x.jsonl"]).data == "x.jsonl"
    with pytest.raises(ConfigError, match="missing required option --data"):
        parse_config(Needs, [])


def test_main_guard_prints_one_line_and_exits_2(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from nanopost.plumbing.config import main_guard, parse_config

        @dataclass
        class C:
            lr: float = 1.0

        main_guard(lambda: print(parse_config(C).lr))
    """))
    root = Path(__file__).resolve().parents[1]
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                                       cwd=root, env={"PYTHONPATH": str(root)})
    ok = run("--lr", "2")
    assert ok.returncode == 0 and ok.stdout.strip() == "2.0"
    bad = run("--lrr", "2")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown option --lrr; did you mean --lr?"


def test_main_guard_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: parse_config(Train, ["--lr", "x"]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --lr: expected float, got 'x'"


def test_format_help_is_available_without_exiting():
    assert "--max-steps INT" in format_help(Train, prog="train.py")


@dataclass
class Repeated:
    plugins: list[str] = field(default_factory=list, metadata={"repeat": True})
    tags: list[str] = field(default_factory=list)


def test_a_repeatable_list_option_adds_up_on_the_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('plugins = ["from_file"]\ntags = ["from_file"]\n')
    cfg = parse_config(Repeated, ["--config", str(toml), "--plugins", "a.py:f", "--plugins", "b:g,c:h",
                                  "--tags", "x", "--tags", "y"])
    assert cfg.plugins == ["a.py:f", "b:g", "c:h"]  # the command line replaces the file's, then grows
    assert cfg.tags == ["y"]  # any other option: the last one given wins


def test_values_starting_with_a_dash_are_values_not_options():
    cfg = parse_config(Train, ["--lr", "-1e-4", "--layers", "-1,2", "--name", "-x", "--optim.weight-decay", "-inf"])
    assert (cfg.lr, cfg.layers, cfg.name, cfg.optim.weight_decay) == (-1e-4, [-1, 2], "-x", float("-inf"))
    with pytest.raises(ConfigError, match=r"unexpected argument '-x'"):
        parse_config(Train, ["-x"])


def test_parser_mistakes_are_config_errors_never_an_exit():
    for argv in (["--no-compile=1"], ["--compile", "--no-compile", "x"], ["--", "x"], ["--config"]):
        with pytest.raises(ConfigError):
            parse_config(Train, argv)


def test_to_toml_round_trips_through_tomllib():
    import math
    import tomllib

    from nanopost.plumbing.config import to_toml

    data = {
        "name": 'quote " backslash \\ newline \n tab \t del \x7f bell \x07 é 字 😀',
        "n": -3, "x": 2.5e-8, "big": 1e300, "pos": math.inf, "neg": -math.inf, "flag": False, "unset": None,
        "ints": [1, 2], "empty_list": [], "nested": [[0, 1.0], [0.5, 0.7]], "stages": [{"until": 0.5, "levels": [1, 3]}],
        "empty_table": {}, "weights": {"accuracy": 1.0, "odd key.x": 2}, "group": {"lr": 1e-3, "inner": {"deep": "yes"}},
        "after_tables": "still top level",
    }
    back = tomllib.loads(to_toml(data))
    expected = {**data, "unset": "none"}  # TOML has no null; `X | None` options read "none" back as None
    assert back == expected
    assert math.isnan(tomllib.loads(to_toml({"v": math.nan}))["v"])
