"""Register this host with the Argus server and keep the agent token it returns."""

from __future__ import annotations

from argus_agent.argus_api import ArgusClient
from argus_agent.config import Settings
from argus_agent.credentials import AgentCredentials, load_credentials, save_credentials
from argus_agent.errors import NotRegisteredError, ServerError, StateError
from argus_agent.logsetup import get_logger

log = get_logger(__name__)

CAPABILITIES = ["rerun", "stop"]


async def register_host(settings: Settings, user_token: str, *, force: bool) -> AgentCredentials:
    """POST hostname, version and capabilities with the ``em_live_`` token, then store the
    agent token atomically with mode 0600 in the state dir.

    Without ``force`` an existing registration is kept and StateError says how to rotate it.
    Raises ServerError subclasses when the server refuses.
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
            raise StateError(
                f"already registered as {existing.agent_id} with {existing.server_url} "
                f"({path}); use --force to register again (the server rotates the token)"
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
