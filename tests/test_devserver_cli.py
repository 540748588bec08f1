"""The `argus-agent dev-server` command as a real process: what it prints, its help, its
hints, and a taken port (the server itself is tested in ``test_devserver.py``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.test_devserver import TLS

ROOT = Path(__file__).resolve().parents[1]


def _run_dev_server_cli(*args: str) -> tuple[str, str, int]:
    """Run the real `argus-agent dev-server --port 0 ARGS`, wait until it listens, check it
    answers, stop it with SIGTERM; return its stdout, stderr and exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "argus_agent.cli", "dev-server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("argus dev-server listening on http://"), first
        url = first.split()[-1].replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{url}/health", verify=TLS, timeout=5).json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        # Not communicate(): it would bypass what readline() already buffered. The output is
        # a few lines, far below a pipe's capacity, so waiting first cannot deadlock.
        assert proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return first + out, err, proc.returncode


def test_dev_server_without_user_says_how_to_get_a_token() -> None:
    out, err, code = _run_dev_server_cli()
    assert code == 0
    assert "token" not in out  # stdout: only the listening line
    assert "no user created" in err
    assert "--user NAME" in err  # the way to a token
    assert "/api/_dev/users" in err
    assert "WARNING" not in err  # loopback: nothing to warn about


def test_dev_server_with_user_prints_its_token_and_no_hint() -> None:
    out, err, code = _run_dev_server_cli("--user", "alice")
    assert code == 0
    assert re.search(r"^user alice token em_live_\S+$", out, re.MULTILINE)
    assert "no user created" not in err and "WARNING" not in err


def test_dev_server_on_a_non_loopback_address_warns_that_dev_routes_have_no_auth() -> None:
    out, err, code = _run_dev_server_cli("--host", "0.0.0.0", "--user", "alice")
    assert code == 0
    assert "user alice token em_live_" in out
    assert "WARNING: listening on 0.0.0.0, which is not a loopback address" in err
    assert "/api/_dev routes have no authentication" in err


def test_dev_server_help_explains_every_flag_with_its_default() -> None:
    import argparse

    from argus_agent.cli import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    dev = subparsers.choices["dev-server"]
    own = [a for a in dev._actions if a.dest not in ("help", "config", "debug")]
    assert {a.option_strings[0] for a in own} == {
        "--host",
        "--port",
        "--db",
        "--user",
        "--poll-interval",
        "--no-websocket",
        "--no-frame-worker",
        "--no-rate-limit",
    }
    for action in own:
        assert action.help and "(default:" in action.help, action.option_strings
    assert "docs/devserver.md" in (dev.description or "")
    assert "NO authentication" in (dev.description or "")


def test_dev_server_on_a_taken_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "argus_agent.cli", "dev-server", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines() == [
        f"argus-agent: dev-server: cannot listen on 127.0.0.1 port {port}: Address already in "
        "use; choose another --host or --port (--port 0 picks a free one)"
    ]
