"""`jaxllm --help` and every subcommand's help are complete, and every example parses.

The subcommands are read from the parser at run time, so a new subcommand is covered
(and must bring a description, an example and help for each option) without editing
this file.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys

import pytest

from jaxllm import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0, argv
    return capsys.readouterr().out


def _example_commands(name: str) -> list[list[str]]:
    """The argv of each example of `name` (EXAMPLES may hold several, one a line)."""
    lines = [line.strip() for line in cli.EXAMPLES[name].splitlines() if line.strip()]
    return [shlex.split(line) for line in lines]


def test_every_subcommand_has_an_example_entry():
    assert set(cli.EXAMPLES) == set(SUBCOMMANDS), "EXAMPLES and the subcommands differ"
    assert set(cli.COMMANDS) == set(SUBCOMMANDS), "COMMANDS and the subcommands differ"


def test_top_level_help_lists_every_subcommand(capsys):
    text = _help(["--help"], capsys)
    assert text.startswith("usage: jaxllm")
    for name in SUBCOMMANDS:
        # The subcommand table: "  name   one-line help", the help not empty.
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", text, re.M), name
        assert f"jaxllm {name}" in text, f"top-level examples miss `jaxllm {name}`"


def test_console_script_help_exits_zero():
    """The installed entry point (not just `main`) prints the help."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_is_complete(name, capsys):
    sub = _subparsers()[name]
    assert sub.description and len(sub.description.split()) >= 4, f"{name}: no description"
    text = _help([name, "--help"], capsys)
    assert text.startswith(f"usage: jaxllm {name}")
    assert sub.description.split()[0] in text
    # "example:" then one or more indented `jaxllm NAME ...` lines.
    match = re.search(r"^example:\n((?:  .+\n?)+)", text, re.M)
    assert match, f"{name}: no 'example:' section in its help"
    for line in match.group(1).splitlines():
        assert line.strip().startswith(f"jaxllm {name} "), (name, line)
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {label}: no help"
        assert len(action.help.split()) >= 2, f"{name} {label}: help too short: {action.help}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_examples_parse(name):
    """Each example's arguments parse (nothing runs), and files it names exist."""
    parser = cli._parser()
    commands = _example_commands(name)
    assert commands
    for argv in commands:
        assert argv[:2] == ["jaxllm", name], argv
        args = parser.parse_args(argv[1:])  # argparse exits (status 2) on a bad example
        assert args.command == name
        for word in argv[2:]:
            if word.startswith("configs/"):
                assert os.path.exists(os.path.join(REPO, word)), f"{name}: {word} is missing"


def test_train_example_overrides_are_valid_config_keys():
    """The train example's overrides are keys the config accepts (validated, not run)."""
    from jaxllm.config import load_config, parse_override

    for argv in _example_commands("train"):
        args = cli._parser().parse_args(argv[1:])
        cfg = load_config(os.path.join(REPO, args.config), args.overrides)
        for text in args.overrides:
            key, _ = parse_override(text)
            section, field = key.split(".")
            assert hasattr(getattr(cfg, section), field), key


def _readme_commands() -> list[list[str]]:
    """Every `jaxllm ...` command in the README's ```bash blocks, continuations joined."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [
        shlex.split(line, comments=True) for line in text.splitlines() if line.startswith("jaxllm ")
    ]


def test_readme_commands_parse():
    """The README's commands (the tour included) are ones the CLI accepts (not run)."""
    commands = _readme_commands()
    used = {argv[1] for argv in commands}
    assert {"train", "eval", "compress", "export", "plan"} <= used, used
    parser = cli._parser()
    for argv in commands:
        assert parser.parse_args(argv[1:]).command == argv[1], argv
