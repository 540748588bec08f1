"""The systemd units: they verify, their sandbox does not shrink, and every option is decided.

The check itself is .ci/check-units (``systemd-analyze verify`` and ``security --offline``),
run here when systemd-analyze is installed; under CI=true (set by .ci/run, which installs
it) a missing systemd-analyze fails instead of skipping. The other tests read the unit
files and need nothing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "check-units"
SYSTEM = ROOT / "systemd" / "argus-agent.service"
USER = ROOT / "systemd" / "argus-agent-user.service"
IN_CI = os.environ.get("CI") == "true"

#: Every hardening option the system unit must decide: set it, or say in a comment why not.
HARDENING = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "DevicePolicy",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictSUIDSGID",
    "NoNewPrivileges",
    "LockPersonality",
    "RestrictRealtime",
    "RestrictNamespaces",
    "MemoryDenyWriteExecute",
    "SystemCallFilter",
    "SystemCallArchitectures",
    "CapabilityBoundingSet",
    "RestrictAddressFamilies",
    "ProtectProc",
    "ProcSubset",
    "PrivateUsers",
    "PrivateNetwork",
    "PrivateIPC",
    "PrivateMounts",
    "IPAddressDeny",
)


def _check_units() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("check_units", str(CHECK))
    spec = importlib.util.spec_from_loader("check_units", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_units_verify_and_their_exposure_has_not_risen() -> None:
    if shutil.which("systemd-analyze") is None:
        reason = "systemd-analyze is not installed (apt-get install systemd; .ci/run does)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(
        [sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode == 2 and not IN_CI:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", [SYSTEM, USER], ids=lambda p: p.name)
def test_units_restart_reload_and_never_kill_jobs(unit: Path) -> None:
    settings = _settings(unit)
    assert settings["Restart"] == ["always"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["KillMode"] == ["process"]
    assert settings["Delegate"] == ["yes"]
    assert settings["RestartPreventExitStatus"] == ["3 4"]  # config and token/state errors
    assert 1 <= int(settings["RestartSec"][0]) <= 30


def test_every_hardening_option_of_the_system_unit_is_used_or_explained() -> None:
    text = SYSTEM.read_text()
    settings = _settings(SYSTEM)
    left_out = text.split("# Left out, and why:")[1]
    for option in HARDENING:
        used = option in settings
        explained = re.search(rf"^# {option}=", left_out, re.MULTILINE) or re.search(
            rf"^#.*\b{option}=", left_out, re.MULTILINE
        )
        assert used or explained, f"{option}: neither set nor explained in {SYSTEM.name}"
    # What jobs need stays: a job could not use sudo, its GPUs, its home or the shared /tmp.
    for option in ("NoNewPrivileges", "PrivateDevices", "ProtectHome", "PrivateTmp"):
        assert option not in settings
    assert "ProtectControlGroups" not in settings  # the agent writes its delegated subtree


def test_the_docs_give_the_scores_the_check_enforces() -> None:
    limits = _check_units().MAX_EXPOSURE
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for unit, score in limits.items():
        assert re.search(rf"`{re.escape(unit)}`[^\n|]*\|[^\n|]*\b{score}\b", docs), (
            f"docs/*.md has no table row giving {unit}'s exposure {score}"
        )
