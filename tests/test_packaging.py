"""Installing never fetches someone else's project, and the units run what the README installs.

"argus-agent" on the public package index is an unrelated project (an "AI threat-modeling
agent"), so no instruction of ours may name it as a package to install.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAKEN = "argus-agent"
#: `pip install argus-agent`, `pipx install argus-agent[server]`, `pip install -U argus-agent`
INSTALLS_TAKEN_NAME = re.compile(
    r"\bpipx? +install\b[^\n`]*?(?<![/\w-])['\"]?argus-agent(?:\[[a-z,]+\])?['\"]?(?![\w/-])"
)


def _texts() -> dict[Path, str]:
    paths = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("systemd/*")]
    paths += [*ROOT.glob("argus_agent/**/*.py"), *ROOT.glob("argus_agent/data/*"), ROOT / ".ci/run"]
    return {p: p.read_text() for p in paths if p.is_file()}


def test_the_distribution_is_not_named_after_someone_elses_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != TAKEN
    assert project["scripts"] == {"argus-agent": "argus_agent.cli:main"}
    for extra in project["optional-dependencies"].values():
        assert not any(dep.startswith(f"{TAKEN}[") for dep in extra)


def test_no_instruction_installs_the_unrelated_package() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path, text in _texts().items()
        for match in INSTALLS_TAKEN_NAME.finditer(text)
    ]
    assert offenders == []
    assert INSTALLS_TAKEN_NAME.search("pip install argus-agent")  # the check itself works
    assert INSTALLS_TAKEN_NAME.search("pip install 'argus-agent[server]'")
    assert not INSTALLS_TAKEN_NAME.search("pip install /path/to/argus-agent-checkout")


def test_the_units_run_the_argus_agent_the_readme_installs() -> None:
    readme = (ROOT / "README.md").read_text()
    system = (ROOT / "systemd/argus-agent.service").read_text()
    user = (ROOT / "systemd/argus-agent-user.service").read_text()
    assert "ExecStart=/opt/argus-agent/bin/argus-agent run" in system
    assert "python3 -m venv /opt/argus-agent" in readme
    assert "/opt/argus-agent/bin/pip install" in readme
    assert "ExecStart=%h/.local/bin/argus-agent run" in user
    assert "pipx install /path/to/argus-agent-checkout" in readme  # pipx → ~/.local/bin


def test_every_declared_runtime_dependency_is_used() -> None:
    """Each dependency of the agent is imported by it (test-only ones live in the extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    imports = {"nvidia-ml-py": "pynvml"}  # distribution name -> import name
    code = "\n".join(p.read_text() for p in (ROOT / "argus_agent").rglob("*.py"))
    unused = []
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0]
        module = imports.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {re.escape(module)}\b", code, re.MULTILINE):
            unused.append(name)
    assert unused == []
