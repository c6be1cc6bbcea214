"""The README and docs/ are executable truth (issue 37, 42). Their shell blocks are collected and each
command is handed to the program it names, as a user would type it: the program must
exist, and its own argument parser must accept the command (flags, choices, subcommands;
for training, the run config's keys and values too) without running it. A command written
as a synopsis (`...`, `[optional]`) has each of its flags checked instead. A block that
shows a transcript (`$ command`, then its output) is run, and prints what it shows. The
commands that run here end to end are run by their own tests (the demo: test_demo.py; the
eval CLI: test_eval.py; suites and CLIP_benchmark's CLI: test_suite.py; a sweep:
test_sweep.py; the c10d torchrun command: test_recovery.py)."""
import argparse
import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from conftest import REPO_ROOT

# The README (a front door) and the pages of docs/ it leads to: every command in either
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
TEXT = {page.relative_to(REPO_ROOT).as_posix(): page.read_text() for page in PAGES}
# Programs whose commands are the environment's, not ours: shell built-ins and installers
NOT_CHECKED = {"export", "source", "pip", "cd"}


def shell_commands(text: str) -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def transcripts(text: str) -> list[tuple[str, list[str]]]:
    """Blocks that start with `$ command`: the command and the lines it prints."""
    out = []
    for block in re.findall(r"```\n(\$ .*?)```", text, re.S):
        first, *shown = block.strip().splitlines()
        out.append((first[2:], shown))
    return out


class Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@contextlib.contextmanager
def stop_at_parsing():
    """A dry run: the program builds its parser and stops where it would parse."""
    def parse_args(self, args=None, namespace=None):
        raise Parsed(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        yield


def parser_of(main, *args) -> argparse.ArgumentParser:
    with stop_at_parsing(), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(*args)
        except Parsed as p:
            return p.parser
    raise AssertionError(f"{main.__module__}.{main.__name__} parsed no arguments")


def known_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= known_flags(sub)
    return flags


def check(parser: argparse.ArgumentParser, args: list[str], synopsis: bool, command: str) -> argparse.Namespace | None:
    if synopsis:
        flags = {a.split("=")[0].strip("[]|") for a in args if a.lstrip("[").startswith("--")}
        unknown = sorted(f for f in flags if f not in known_flags(parser))
        if unknown:
            pytest.fail(f"{command}: {parser.prog} has no {', '.join(unknown)}")
        return None
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{command}: {parser.prog} refuses it: {err.getvalue().strip().splitlines()[-1]}")


def module_main(name: str):
    module = importlib.import_module(name)
    if not hasattr(module, "main"):  # a package: python -m runs its __main__
        module = importlib.import_module(f"{name}.__main__")
    return module.main


def check_train(args: list[str], synopsis: bool, command: str):
    from launch import train
    ns = check(parser_of(train.main, ["--deepspeed_config", "x"]), args, synopsis, command)
    if ns is not None:  # the run config as written: every key known, every value valid
        from pipeline.config import ConfigError, load_config
        try:
            load_config(REPO_ROOT / ns.config if ns.config else None, ns.overrides)
        except ConfigError as e:
            pytest.fail(f"{command}: {e}")


def check_command(words: list[str]):
    command = shlex.join(words)
    synopsis = any(w in ("...", "|") or w.startswith("[") or w.endswith("]") for w in words)
    words = [w for w in words if w != "..."]
    program, args = words[0], words[1:]
    if program in NOT_CHECKED:
        return
    if program == "python" and args[:1] == ["-m"]:
        module, args = args[1], args[2:]
        check(parser_of(module_main(module), ["--help"]), args, synopsis, command)
    elif program == "bash":
        script, args = REPO_ROOT / args[0], args[1:]
        assert script.is_file(), f"{command}: no {args[0]}"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{command}: not valid bash"
        if script.name == "demo.sh":
            from launch.demo import main
            check(parser_of(main, ["--help"]), args, synopsis, command)
    elif program == "deepspeed":
        from deepspeed.launcher.runner import parse_args
        at = next(i for i, a in enumerate(args) if a.endswith(".py"))
        assert args[at] == "launch/train.py", command
        check(parser_of(parse_args, []), [*args[:at], "launch/train.py"], synopsis, command)
        check_train(args[at + 1:], synopsis, command)
    elif program == "torchrun" and "-m" in args:  # a module run on every process (data_prep.curate embed)
        from torch.distributed.run import get_args_parser
        at = args.index("-m")
        check(get_args_parser(), [*args[:at + 1], args[at + 1]], synopsis, command)
        check(parser_of(module_main(args[at + 1]), ["--help"]), args[at + 2:], synopsis, command)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser
        at = next(i for i, a in enumerate(args) if a.endswith(".py"))
        assert args[at] == "launch/train.py", command
        check(get_args_parser(), [*args[:at], "launch/train.py"], synopsis, command)
        check_train(args[at + 1:], synopsis, command)
    elif program == "mlflow":
        import click
        from mlflow.cli import cli
        sub = cli.get_command(click.Context(cli, info_name="mlflow"), args[0])
        assert sub is not None, f"{command}: mlflow has no command {args[0]!r}"
        try:
            sub.make_context(args[0], list(args[1:]))  # click's own parse
        except click.ClickException as e:
            pytest.fail(f"{command}: mlflow {args[0]} refuses it: {e.format_message()}")
    elif program == "clip_benchmark":
        from clip_benchmark import cli
        with mock.patch.object(sys, "argv", ["clip_benchmark", "--help"]):
            parser = parser_of(cli.get_parser_args)
        check(parser, args, synopsis, command)
    elif program == "sbatch":
        script = next(a for a in args if a.endswith(".sh"))
        assert (REPO_ROOT / script).is_file(), f"{command}: no {script}"
        assert subprocess.run(["bash", "-n", str(REPO_ROOT / script)]).returncode == 0
        ds_config, recipe, *overrides = args[args.index(script) + 1:]
        check_train(["--deepspeed_config", ds_config, "--config", recipe, *overrides], synopsis, command)
    else:
        pytest.fail(f"{command}: the docs run {program!r}, which this test does not know how to check")


COMMANDS = [(page, words) for page, text in TEXT.items() for words in shell_commands(text)]
TRANSCRIPTS = [(page, *t) for page, text in TEXT.items() for t in transcripts(text)]


def test_the_pages_have_commands_to_check():
    """The front door shows the flow; the pages hold the rest (each concern's commands)."""
    pages = {page for page, _ in COMMANDS}
    assert len(COMMANDS) >= 35 and TRANSCRIPTS and "README.md" in pages and len(pages) >= 8, sorted(pages)


def test_the_readme_is_a_front_door_into_every_page():
    """At most ~300 lines, a table of contents, and a link to every page of docs/ (each of
    which is reached from it); every relative link of every page resolves to a file."""
    readme = TEXT["README.md"]
    assert len(readme.splitlines()) <= 300 and "## Contents" in readme
    for page in TEXT:
        if page.startswith("docs/"):
            assert f"]({page})" in readme, f"README.md does not link {page}"
    for page, text in TEXT.items():
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (REPO_ROOT / page).parent.joinpath(target).exists(), f"{page}: link to {target} leads nowhere"


@pytest.mark.parametrize("page,words", COMMANDS, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:70])
def test_each_command_is_accepted_by_its_program(page, words):
    check_command(words)


@pytest.mark.parametrize("page,command,shown", TRANSCRIPTS, ids=lambda c: str(c)[:60])
def test_each_transcript_prints_what_the_page_shows(page, command, shown):
    words = shlex.split(command)
    assert words[0] == "python"
    done = subprocess.run([sys.executable, *words[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert (done.stdout + done.stderr).strip().splitlines() == shown


def test_a_wrong_flag_or_config_key_in_a_command_is_caught():
    """The check itself fails on what a README edit could break."""
    for bad in (["python", "-m", "eval", "--checkpoint", "x", "--zero-shot", "d"],
                ["deepspeed", "--num_gpux", "2", "launch/train.py", "--deepspeed_config", "x.json"],
                ["deepspeed", "launch/train.py", "--deepspeed_config", "x.json", "--config",
                 "launch/recipes/demo-clip-tiny.yaml", "optim.lrr=1"],
                ["python", "-m", "eval.suite", "...", "--suitee", "x"],
                ["mlflow", "ui", "--backend-store-urx", "sqlite:///x.db"]):
        with pytest.raises(pytest.fail.Exception):
            check_command(bad)
