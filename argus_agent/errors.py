"""The one exception tree of argus-agent.

Every error the agent raises on purpose derives from :class:`AgentError`. Each class says
whether retrying can help (``transient``) and which process exit code the CLI maps it to;
``cli.py`` is the only place that turns an error into an exit code and one line for a user::

    AgentError
    ├── ConfigError               config file or environment is wrong        (fatal, exit 3)
    ├── StateError                state dir / token file unusable            (fatal, exit 4)
    │   ├── InsecureTokenFileError   token file readable by group or others
    │   ├── NotRegisteredError       no token file: run `argus-agent register`
    │   └── AlreadyRunningError      another agent runs on this state dir
    ├── StateUnavailableError     state database unusable now (disk full)    (exit 1, restarted)
    ├── ServerError               talking to the Argus server failed
    │   ├── TransientServerError     connection refused, timeout, 5xx        (retry with backoff)
    │   ├── RateLimitedError         429; carries Retry-After seconds        (retry after it)
    │   ├── AgentTokenRejectedError  401 agent token unknown / revoked       (retry slowly)
    │   ├── AuthError                other 401/403 (bad user token, wrong agent)
    │   ├── NotFoundError            404
    │   ├── ConflictError            409 (e.g. command already acked)
    │   └── ProtocolError            an answer we cannot understand, other 4xx
    ├── LoopCrashedError          a loop of the daemon raised            (exit 6, systemd restarts)
    └── JobError                  a job could not be launched or stopped
        ├── PayloadError             a server command is malformed or refused by policy
        └── LaunchError              the exec itself failed

Nothing here prints or exits.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every deliberate argus-agent error."""

    exit_code: int = 1
    transient: bool = False


class ConfigError(AgentError):
    """The configuration (file or environment) is invalid; the message is one line per mistake."""

    exit_code = 3


class StateError(AgentError):
    """The state directory or a file in it cannot be used."""

    exit_code = 4


class InsecureTokenFileError(StateError):
    """The agent token file can be read by group or others."""


class NotRegisteredError(StateError):
    """There is no agent token yet: the host has not been registered."""


class StateUnavailableError(AgentError):
    """A state database cannot be used right now (disk full, I/O error). Not a state-dir
    problem that needs a person: the service manager restarts the agent (exit 1), which
    tries again. The message names the path."""

    exit_code = 1
    transient = True


class ServerError(AgentError):
    """A call to the Argus server failed.

    ``status`` is the HTTP status when the server answered, ``detail`` its error text.
    """

    exit_code = 5

    def __init__(self, message: str, *, status: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = detail


class TransientServerError(ServerError):
    """The server could not be reached or answered 5xx; retrying later may succeed."""

    transient = True


class RateLimitedError(ServerError):
    """The server answered 429; ``retry_after`` is how long it asked us to wait, in seconds."""

    transient = True

    def __init__(self, message: str, *, retry_after: float, status: int = 429, detail=None):
        super().__init__(message, status=status, detail=detail)
        self.retry_after = retry_after


class AgentTokenRejectedError(ServerError):
    """The server does not know our agent token (rotated by a re-register, or revoked)."""

    exit_code = 4


class AuthError(ServerError):
    """The server refused our credentials for another reason (401/403)."""

    exit_code = 4


class NotFoundError(ServerError):
    """The server answered 404."""


class ConflictError(ServerError):
    """The server answered 409 (e.g. a command that is already acked)."""


class ProtocolError(ServerError):
    """The server's answer could not be understood, or a 4xx we have no better class for."""


class AlreadyRunningError(StateError):
    """Another agent holds the state dir's lock."""


class LoopCrashedError(AgentError):
    """A long-running loop of the daemon raised: the daemon goes down, systemd restarts it."""

    exit_code = 6


class JobError(AgentError):
    """A job could not be launched or stopped; the message is the reason acked to the server."""


class PayloadError(JobError):
    """A command from the server is malformed or refused by policy.

    The message is acked to the server; ``audit`` holds details for the local audit log only
    (e.g. a resolved path the requester must not learn).
    """

    def __init__(self, message: str, *, audit: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.audit = audit or {}


class LaunchError(JobError):
    """Starting the job's process failed (missing shell, permission, cwd vanished...)."""
