"""Register this host with the Argus server and keep the agent token it returns; and what
`argus-agent register` tells the operator around it (already registered, what ``--force``
costs, how a system agent gets a reporter token for telemetry)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from argus_agent.argus_api import ArgusClient
from argus_agent.config import Settings
from argus_agent.credentials import AgentCredentials, load_credentials, save_credentials
from argus_agent.errors import NotRegisteredError, ServerError, StateError
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

CAPABILITIES = ["rerun", "stop"]


class AlreadyRegisteredError(StateError):
    """The host is registered with this server already (``existing``); without ``force``
    nothing is done. Not a failure for `argus-agent register` (exit 0: provisioning
    scripts run it again)."""

    def __init__(self, message: str, existing: AgentCredentials) -> None:
        super().__init__(message)
        self.existing = existing


def same_server(a: str, b: str) -> bool:
    """Whether two URLs name the same server (scheme and host compared case-insensitively,
    default ports and a trailing slash ignored)."""

    def norm(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url.rstrip("/"))
        default = {"http": 80, "https": 443}.get(parts.scheme.lower())
        return (parts.scheme.lower(), (parts.hostname or ""), parts.port or default, parts.path)

    return norm(a) == norm(b)


async def register_host(settings: Settings, user_token: str, *, force: bool) -> AgentCredentials:
    """POST hostname, version and capabilities with the ``em_live_`` token, then store the
    agent token atomically with mode 0600 in the state dir.

    Without ``force`` an existing registration is kept: AlreadyRegisteredError when it is
    with this server (or config names none), StateError when config names another one (the
    agent would refuse to run: ``--force`` moves it). Raises ServerError subclasses when the
    server refuses.
    """
    path = settings.token_path
    if not force:
        try:
            existing = load_credentials(path, check_mode=False)
        except NotRegisteredError:
            pass
        except StateError:
            raise StateError(
                f"{path}: a token file exists but is unreadable; use --force to register anew"
            ) from None
        else:
            configured = settings.server.url
            if "url" in settings.server.model_fields_set and not same_server(
                configured, existing.server_url
            ):
                raise StateError(
                    f"registered as {existing.agent_id} with {existing.server_url} ({path}), "
                    f"not with {configured}; use --force to register with {configured} "
                    "instead (the agent then talks to that server only)"
                )
            raise AlreadyRegisteredError(
                f"already registered as {existing.agent_id} with {existing.server_url} "
                f"({path}); nothing to do",
                existing,
            )
    client = ArgusClient(settings.server.url, timeout_s=settings.server.timeout_s)
    try:
        result = await client.register(user_token, settings.agent.hostname, CAPABILITIES)
        try:
            owner: str | None = await client.whoami(user_token)
        except ServerError as exc:
            log.warning("could not learn which Argus user registered this agent", error=str(exc))
            owner = None
    finally:
        await client.aclose()
    creds = AgentCredentials(
        server_url=settings.server.url,
        agent_id=result.agent_id,
        agent_token=result.agent_token,
        poll_interval_s=result.poll_interval_s,
        owner=owner,
    )
    save_credentials(path, creds)
    return creds


def force_warning(hostname: str, *, done: bool = False) -> str:
    """What ``--force`` costs (Argus v0.3.0 rotates the agent token on every register);
    with ``done``, that it was paid."""
    others = (
        f"every other agent registered under host name {hostname!r} (another state dir, "
        "another machine of the same name) is locked out until it registers again"
    )
    if done:
        return f"note: the server issued a new agent token; the old one no longer works: {others}"
    return (
        "note: `argus-agent register --force` registers again: the server issues a new "
        f"agent token, and {others}"
    )


def reporter_token_hint(
    settings: Settings,
    config_path: Path,
    token_file: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    euid: int | None = None,
) -> str | None:
    """For a system agent (root) whose service will have no reporter token: how to give it
    one, so that it sends telemetry; None when it has one, or for a per-user agent (whose
    shell environment is its own). The token in this shell (``ARGUS_TOKEN``, or
    ``--token-file``) is not the service's: only ``server.token_file`` or ``server.token``
    in the config file reach it."""
    env = os.environ if env is None else env
    if (os.geteuid() if euid is None else euid) != 0 or settings.server.token_file is not None:
        return None
    from_env = any(env.get(name) for name in ("ARGUS_TOKEN", "ARGUS_AGENT_SERVER_TOKEN"))
    if settings.server.token and not from_env:
        return None  # server.token in the config file: the service reads it too
    suggested = token_file or Path("/etc/argus-agent/reporter-token")
    store = (
        ""
        if token_file
        else f"store your em_live_ token in {suggested} (mode 0600, owned by root), then "
    )
    return (
        "note: the agent service has no reporter token of its own (ARGUS_TOKEN or "
        "--token-file here does not reach a systemd service), so it will not send telemetry "
        "(resource snapshots, log lines, how each run ended) for the runs it starts; "
        f"reruns and stops work without it. To give it one, {store}set "
        f'server.token_file = "{suggested}" in {config_path} and restart the agent'
    )
