"""docs/exit-codes.md is true to the code: every error class with its exit code, every
command, and the codes systemd does not restart on."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import argus_agent
from argus_agent import cli
from argus_agent.errors import AgentError

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "exit-codes.md").read_text()


def _section(title: str) -> str:
    """The text of the doc's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert match, f"docs/exit-codes.md has no section {title!r}"
    return match.group(1)


def _all_error_classes() -> dict[str, type[AgentError]]:
    """Every public AgentError subclass defined in the package (all modules imported)."""
    for module in pkgutil.walk_packages(argus_agent.__path__, "argus_agent."):
        importlib.import_module(module.name)
    found: dict[str, type[AgentError]] = {}
    todo: list[type[AgentError]] = [AgentError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("argus_agent") and not cls.__name__.startswith("_"):
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_class_is_listed_with_its_exit_code() -> None:
    rows = dict(
        re.findall(r"^\| `(\w+)` \| (\d+) \|", _section("Which error gives which code"), re.M)
    )
    classes = _all_error_classes()
    assert len(classes) > 10  # the walk found the tree
    missing = sorted(set(classes) - set(rows))
    assert missing == [], f"add these error classes to docs/exit-codes.md: {missing}"
    stale = sorted(set(rows) - set(classes))
    assert stale == [], f"docs/exit-codes.md lists classes that do not exist: {stale}"
    wrong = {
        name: (int(code), classes[name].exit_code)
        for name, code in rows.items()
        if int(code) != classes[name].exit_code
    }
    assert wrong == {}, f"(documented, real) exit codes differ: {wrong}"


def test_every_code_an_error_can_give_is_explained() -> None:
    explained = {int(c) for c in re.findall(r"^\| (\d+) \|", _section("The codes"), re.M)}
    used = {cls.exit_code for cls in _all_error_classes().values()}
    assert used - explained == set()
    assert {0, 2, 130, 143} <= explained  # success, argparse, second SIGINT / SIGTERM


def test_every_command_has_a_row() -> None:
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = re.findall(r"^\| `([a-z-]+)", _section("Each command"), re.M)
    listed = {
        word
        for row in re.findall(r"^\|([^|]*)\|", _section("Each command"), re.M)
        for word in re.findall(r"`([a-z][a-z-]*)", row)
    }
    assert rows, "no command rows"
    missing = sorted(set(subparsers.choices) - listed)
    assert missing == [], f"add these commands to docs/exit-codes.md: {missing}"
    config = subparsers.choices["config"]
    actions = next(a for a in config._actions if isinstance(a, argparse._SubParsersAction))
    section = _section("Each command")
    missing = sorted(a for a in actions.choices if f"`config {a}`" not in section)
    assert missing == [], f"add these config actions to docs/exit-codes.md: {missing}"


def test_restart_prevented_codes_match_the_units() -> None:
    values = set()
    for unit in ("argus-agent.service", "argus-agent-user.service"):
        text = (ROOT / "systemd" / unit).read_text()
        match = re.search(r"^RestartPreventExitStatus=(.+)$", text, re.M)
        assert match, unit
        values.add(match.group(1).strip())
    assert len(values) == 1, f"the two units prevent restarts on different codes: {values}"
    assert f"RestartPreventExitStatus={values.pop()}" in _section("Under systemd")


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["config", "check"], 1),  # `config check` answers yes or no, whatever is wrong
        (["register"], 3),  # the same config error elsewhere is exit 3
        # ... except for the operator's commands: a warning, then the state dir (here no
        # agent answers on it: 2).
        (["status"], 2),
    ],
)
def test_a_config_error_exits_as_documented(
    argv: list[str], code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.toml"
    state = ["--state-dir", str(tmp_path / "state")] if argv == ["status"] else []
    assert cli.main(["--config", str(missing), *argv, *state]) == code
    assert "config file not found" in capsys.readouterr().err


def test_a_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["no-such-command"])
    assert exited.value.code == 2
    capsys.readouterr()
