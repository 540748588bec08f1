"""Fixtures: a reference server on 127.0.0.1:0, a user of it, settings for an agent."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from argus_agent.config import Settings
from argus_agent.devserver import DevServer
from argus_agent.logsetup import configure
from tests.cgroupenv import cgroup_root  # noqa: F401  (the fixture, for every test module)
from tests.leftovers import LeftoverGuard
from tests.slurmenv import slurm, slurm_cluster, slurm_settings  # noqa: F401  (the fixtures)
from tests.support import ArgusUser, settings_for


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    """Agent logs go through stdlib logging, so pytest's caplog sees them."""
    configure("debug", stream=sys.stderr, json=False)


@pytest.fixture(scope="session", autouse=True)
def _leftover_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeftoverGuard]:
    """Marks the session's processes (``tests/leftovers.py``); at its end, fails the run if
    anything the session started still runs (and kills it)."""
    guard = LeftoverGuard(basetemp=tmp_path_factory.getbasetemp())
    guard.start_session()
    yield guard
    leftovers = guard.end_session()
    if leftovers:
        pytest.fail(guard.describe(leftovers, "the test session"), pytrace=False)
    if cgroups := guard.check_cgroups(session=True):
        pytest.fail(f"the test session left cgroup(s) (removed now): {cgroups}", pytrace=False)


@pytest.fixture(autouse=True)
def _no_leftover_processes(
    request: pytest.FixtureRequest, _leftover_guard: LeftoverGuard
) -> Iterator[None]:
    """Every process a test starts must be gone when it ends: what is still alive after a
    short grace is killed and fails the test (see ``tests/leftovers.py``)."""
    before = _leftover_guard.snapshot()
    yield
    leftovers = _leftover_guard.check(before)
    if leftovers:
        pytest.fail(_leftover_guard.describe(leftovers, request.node.nodeid), pytrace=False)
    if cgroups := _leftover_guard.check_cgroups():
        pytest.fail(f"{request.node.nodeid} left cgroup(s) (removed now): {cgroups}", pytrace=False)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's own Argus settings."""
    for name in list(os.environ):
        if name.startswith("ARGUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DevServer]:
    srv = DevServer(db_path=tmp_path / "argus.sqlite", poll_interval_s=0.2, ingest_rate_limit=False)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def user_token(server: DevServer) -> str:
    return server.create_user("alice")


@pytest.fixture
def argus(server: DevServer, user_token: str) -> Iterator[ArgusUser]:
    user = ArgusUser(server.url, user_token)
    yield user
    user.close()


@pytest.fixture
def make_settings(tmp_path: Path, server: DevServer) -> Callable[..., Settings]:
    """Settings for an agent with a short state-dir path (unix sockets have a length limit)."""

    def build(**sections: dict[str, Any]) -> Settings:
        return settings_for(server.url, tmp_path, **sections)

    return build
