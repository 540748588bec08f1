"""The `argus-agent` command line. The one place that maps errors to exit codes.

A user sees one clear line per error on stderr; a traceback only with ``--debug``.

Exit codes (each error class carries its own ``exit_code``): 0 ok, 1 unexpected error or a
state database unusable now, 2 usage, 3 config error, 4 state/token/auth problem (also:
another agent runs on the state dir), 5 server unreachable or refusing, 6 a loop of the
running daemon crashed (systemd restarts it), 130 interrupted. `config check` exits 0 or 1;
`status` 0 healthy, 1 degraded, 2 no agent; `drain`/`undrain`/`stop` 0 done, 1 refused, 2 no
agent. Every command's codes: docs/exit-codes.md (checked by tests/test_exit_codes.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from argus_agent import __version__, views
from argus_agent.config import (
    Settings,
    default_config_path,
    describe_sources,
    load_settings,
    redacted_dump,
)
from argus_agent.errors import AgentError, ConfigError, StateError
from argus_agent.logsetup import configure, get_logger, redact_text

log = get_logger("argus_agent.cli")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"config file (default: {default_config_path()})",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging and tracebacks on errors",
    )
    # The operator's commands (status, jobs, logs, drain, undrain, stop) only need the state
    # dir; see _operator_settings.
    operator = argparse.ArgumentParser(add_help=False, parents=[common])
    operator.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="the agent's state dir (default: agent.state_dir); also used when the config "
        "file is broken",
    )
    parser = argparse.ArgumentParser(
        prog="argus-agent",
        description="Host agent for Argus: reruns and stops training runs on this host.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"argus-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "run",
        parents=[common],
        help="run the daemon in the foreground (default)",
        description="Run the agent in the foreground. SIGTERM or Ctrl-C stops it (running "
        "jobs keep running); SIGHUP (`systemctl reload argus-agent`) re-reads the config "
        "file and applies what can change at run time (log level, intervals, the jobs "
        "policy, telemetry switches), logging what changed and what needs a restart; an "
        "invalid new config is refused and the running one kept.",
    )
    reg = sub.add_parser(
        "register", parents=[common], help="register this host with the Argus server"
    )
    reg.add_argument(
        "--token-file",
        type=Path,
        help="file holding the em_live_ reporter token (default: $ARGUS_TOKEN)",
    )
    reg.add_argument(
        "--force",
        action="store_true",
        help="register again even if registered (rotates the agent token)",
    )
    from argus_agent import statuscheck

    st = sub.add_parser(
        "status",
        parents=[operator],
        help="show what the running agent is doing (exit 0 healthy, 1 degraded, 2 no agent)",
        description=statuscheck.HELP_DESCRIPTION,
        epilog=statuscheck.HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="print the status document with its verdict (schema argus-agent.status.v1, "
        "documented in docs/status.md)",
    )
    sub.add_parser("jobs", parents=[operator], help="list the jobs this host's agent knows")
    logs = sub.add_parser("logs", parents=[operator], help="print a job's log")
    logs.add_argument("batch_id", help="the Argus batch id of the job (the rerun batch)")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new output until the job ends"
    )
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    _operator_parsers(sub, operator)
    cfg = sub.add_parser("config", parents=[common], help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cfg_sub.add_parser(
        "check",
        parents=[common],
        help="list the file and variables read, validate, and print the effective config "
        "(secrets redacted); exit 0 when valid, 1 when not",
    )
    cfg_sub.add_parser(
        "reference",
        parents=[common],
        help="print the configuration reference (Markdown; docs/configuration.md is this)",
    )
    cfg_sub.add_parser(
        "example",
        parents=[common],
        help="print the commented starter config that `init` writes",
    )
    init = sub.add_parser("init", parents=[common], help="write a commented starter config")
    init.add_argument("path", nargs="?", type=Path, help="where (default: the default path)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    demo = sub.add_parser(
        "demo", parents=[common], help="run a self-contained demo against a local reference server"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's temp directory")
    schema = sub.add_parser(
        "schema",
        parents=[common],
        help="print the JSON Schema of the websocket protocol's messages",
    )
    schema.add_argument(
        "--out", type=Path, metavar="DIR", help="write one schema file per direction into DIR"
    )
    dev = sub.add_parser(
        "dev-server",
        parents=[common],
        help="run the reference Argus-compatible server (for development)",
        description="Run the reference Argus-compatible server in the foreground until "
        "Ctrl-C or SIGTERM: Argus v0.3.0's agent, batch and event endpoints, the websocket "
        "endpoint of argus-agent.v1, and /api/_dev routes for tests (listings, user "
        "creation, fault injection). Prints its URL, then one 'user NAME token em_live_...' "
        "line per --user. Its /api/_dev routes have NO authentication: keep it on "
        "127.0.0.1. Walk-through with curl: docs/devserver.md.",
    )
    dev.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; any other "
        "address is warned about, since /api/_dev has no authentication)",
    )
    dev.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)"
    )
    dev.add_argument(
        "--db",
        default=":memory:",
        metavar="FILE",
        help="SQLite file that keeps users, agents, batches, commands and events across "
        "restarts (default: :memory:, gone when the server stops)",
    )
    dev.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME",
        help="create user NAME and print a new em_live_ reporter token for it; repeatable "
        "(default: no user, and a hint on how to get a token)",
    )
    dev.add_argument(
        "--poll-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="poll_interval_s the server hands to agents when they register (default: 10, "
        "as Argus v0.3.0)",
    )
    dev.add_argument(
        "--no-websocket",
        dest="websocket",
        action="store_false",
        help="serve no websocket endpoint (GET /api/agents/{id}/ws answers HTTP 403, as from "
        "an unmodified Argus v0.3.0), so agents fall back to REST polling (default: the "
        "websocket endpoint is served)",
    )
    dev.add_argument(
        "--no-frame-worker",
        dest="frame_worker",
        action="store_false",
        help="parse websocket events frames in the server's own process (default: in a "
        "child process while the server stores the frames before them, when this machine "
        "has two CPUs or more)",
    )
    dev.add_argument(
        "--no-rate-limit",
        dest="rate_limit",
        action="store_false",
        help="take events as fast as they come (default: Argus' ingest limit, a burst of 60 "
        "requests, then 10 a second per token, answered 429 with Retry-After)",
    )
    return parser


def _operator_parsers(sub: argparse._SubParsersAction, operator: argparse.ArgumentParser) -> None:
    """`drain`, `undrain`, `stop`: requests to the running agent (operator_commands.py)."""
    codes = (
        "Talks to the agent running on this host's state dir over its control socket; only "
        "root and the agent's own user may. Exit codes: 0 done, 1 refused by the agent (its "
        "reason is printed), 2 no agent running or answering."
    )
    drain = sub.add_parser(
        "drain",
        parents=[operator],
        help="refuse new reruns on this host (running jobs go on)",
        description="Drain this host: from now on the agent refuses every new rerun (acked "
        "'failed' with reason 'host draining[: REASON]', and the rerun's batch ends failed), "
        "while running jobs go on and stops still work. Survives agent restarts until "
        "`argus-agent undrain`. Who drained and when is recorded in the audit log and "
        f"shown by `argus-agent status`. {codes}",
    )
    drain.add_argument(
        "--reason", metavar="TEXT", help="why (added to the refusals; at most 500 characters)"
    )
    sub.add_parser(
        "undrain",
        parents=[operator],
        help="accept reruns again after `drain`",
        description=f"End a drain: the agent accepts reruns again (audited). {codes}",
    )
    stop = sub.add_parser(
        "stop",
        parents=[operator],
        help="stop a job this agent supervises, as Argus' Stop button does",
        description="Stop the job of BATCH_ID on this host with the same escalation as a "
        "stop from the server: SIGTERM to its whole process tree, SIGKILL to what is left "
        "after the grace period (jobs.stop_grace_s unless --grace). Audited with your user; "
        "the batch ends 'failed' in Argus as after a server stop. A job already stopping "
        f"keeps its first grace period. {codes}",
    )
    stop.add_argument("batch_id", help="the Argus batch id of the job (see `argus-agent jobs`)")
    stop.add_argument(
        "--grace",
        type=float,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL, 0 to 3600 (default: jobs.stop_grace_s)",
    )


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """Accept Argus' documented spellings: bare `argus-agent` runs, `--register` registers."""
    args = list(argv)
    if "--register" in args:
        args[args.index("--register")] = "register"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = _parser().parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    debug = getattr(args, "debug", False)
    command = args.command or "run"
    try:
        return _dispatch(command, args)
    except KeyboardInterrupt:
        return 130
    except AgentError as exc:
        if debug:
            traceback.print_exc()
        print(f"argus-agent: {redact_text(str(exc))}", file=sys.stderr)
        if command == "config":
            return 1  # `config check` answers yes (0) or no (1), whatever is wrong
        return exc.exit_code
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"argus-agent: unexpected error: {type(exc).__name__}: {redact_text(str(exc))} "
            "(run with --debug for a traceback)",
            file=sys.stderr,
        )
        return 1


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


OPERATOR_COMMANDS = ("status", "jobs", "logs", "drain", "undrain", "stop")


def _operator_settings(args: argparse.Namespace) -> Settings:
    """The settings of an operator's command, which needs only the state dir. A config file
    broken since the agent started (its reload was refused: the agent runs on the one it
    loaded) must not lock the operator out of the agent, so its error becomes a warning on
    stderr and the state dir comes from ``--state-dir``, else ``ARGUS_AGENT_AGENT_STATE_DIR``,
    else the default one."""
    state_dir: Path | None = getattr(args, "state_dir", None)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        from_env = os.environ.get("ARGUS_AGENT_AGENT_STATE_DIR")
        fallback = state_dir or (Path(from_env) if from_env else Settings().agent.state_dir)
        print(
            f"argus-agent: warning: {redact_text(str(exc))}; using the state dir {fallback} "
            "(a running agent keeps the configuration it loaded)",
            file=sys.stderr,
        )
        return Settings.model_validate({"agent": {"state_dir": str(fallback)}})
    if state_dir is None:
        return settings
    agent = settings.agent.model_copy(update={"state_dir": state_dir})
    return settings.model_copy(update={"agent": agent})


def _dispatch(command: str, args: argparse.Namespace) -> int:
    if command == "init":
        return _cmd_init(args)
    if command == "dev-server":
        return _cmd_dev_server(args)
    if command == "schema":
        return _cmd_schema(args.out)
    if command == "demo":
        from argus_agent.demo import run_demo

        configure("warning" if not getattr(args, "debug", False) else "debug")
        return run_demo(keep=args.keep)
    if command == "config":
        return _cmd_config(args)
    settings = _operator_settings(args) if command in OPERATOR_COMMANDS else _settings(args)
    level = "debug" if getattr(args, "debug", False) else settings.agent.log_level
    configure(level)
    if command == "register":
        return _cmd_register(settings, args)
    if command in ("drain", "undrain", "stop"):
        from argus_agent.operator_commands import run_operator_command

        return run_operator_command(command, settings, args)
    if command == "status":
        return _cmd_status(settings, as_json=args.json)
    if command in ("jobs", "logs"):
        from argus_agent.jobs.slurm_store import SLURM_DIR, SlurmStore
        from argus_agent.jobs.store import JobStore

        jobs_dir = settings.agent.state_dir / "jobs"
        slurm_dir = settings.agent.state_dir / SLURM_DIR  # jobs.launcher = "slurm"
        views.state_dir_readable(settings.agent.state_dir)
        stores: list[JobStore | SlurmStore] = [JobStore(jobs_dir)] if jobs_dir.is_dir() else []
        stores += [SlurmStore(slurm_dir)] if slurm_dir.is_dir() else []
        if not stores:
            if command == "jobs":  # the agent has not launched a job yet: an empty table
                print(views.format_jobs([]))
                return 0
            raise StateError(f"{jobs_dir}: no jobs recorded on this host yet")
        if command == "jobs":
            print(views.format_jobs([r for store in stores for r in store.load_all()]))
        else:
            where = [s for s in stores if (s.job_dir(args.batch_id) / "job.json").exists()]
            store = where[0] if where else stores[0]
            views.print_log(store, args.batch_id, tail=args.tail, follow=args.follow)
        return 0
    return _cmd_run(settings, lambda: _settings(args))


def _cmd_config(args: argparse.Namespace) -> int:
    """`config check`: the sources read, then the effective config (exit 0) or one line per
    mistake (exit 1, see main). `config reference` / `example`: the texts generated from the
    config model (docs/configuration.md, config.example.toml)."""
    from argus_agent import configdoc

    if args.config_command == "reference":
        print(configdoc.reference_markdown(), end="")
        return 0
    if args.config_command == "example":
        print(configdoc.example_toml(), end="")
        return 0
    path = getattr(args, "config", None)
    print("sources (lowest precedence first):")
    for line in describe_sources(path):
        print(f"  {line}")
    sys.stdout.flush()  # before a mistake goes to stderr
    settings = load_settings(path)
    print("effective configuration (secrets redacted):")
    print(json.dumps(redacted_dump(settings), indent=2))
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    path: Path = args.path or getattr(args, "config", None) or default_config_path()
    if path.exists() and not args.force:
        raise ConfigError(f"{path}: already exists; use --force to overwrite it")
    template = resources.files("argus_agent").joinpath("data/config.example.toml").read_text()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template)
    except OSError as exc:
        raise StateError(f"{path}: cannot write the config: {exc.strerror}") from None
    print(f"wrote {path}; edit server.url, then run `argus-agent config check`")
    return 0


def _cmd_schema(out: Path | None) -> int:
    from argus_agent import wsproto

    files = wsproto.schema_files()
    if out is None:
        schemas = {d.value: wsproto.json_schema(d) for d in wsproto.Direction}
        print(json.dumps({"protocol": wsproto.SUBPROTOCOL, **schemas}, indent=2))
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in files.items():
            (out / name).write_text(json.dumps(schema, indent=2) + "\n")
    except OSError as exc:
        raise StateError(f"{out}: cannot write the schema: {exc.strerror}") from None
    for name in files:
        print(out / name)
    return 0


def _cmd_register(settings: Settings, args: argparse.Namespace) -> int:
    from argus_agent.credentials import read_user_token
    from argus_agent.registration import (
        AlreadyRegisteredError,
        force_warning,
        register_host,
        reporter_token_hint,
    )

    token_file = args.token_file or settings.server.token_file
    if token_file:
        token = read_user_token(token_file)
    elif settings.server.token:
        token = settings.server.token
    else:
        raise ConfigError(
            "register needs an Argus reporter token: set ARGUS_TOKEN=em_live_... "
            "or pass --token-file FILE (or set server.token_file)"
        )
    try:
        creds = asyncio.run(register_host(settings, token, force=args.force))
    except AlreadyRegisteredError as exc:
        print(str(exc))  # not a failure: provisioning scripts register again
        print(force_warning(settings.agent.hostname))
    else:
        print(
            f"registered {settings.agent.hostname} with {creds.server_url} as "
            f"{creds.agent_id}; token saved to {settings.token_path} (mode 0600)"
        )
        if args.force:
            print(force_warning(settings.agent.hostname, done=True))
    if settings.jobs.slurm_hosts:
        _register_served(settings, token, force=args.force)
    config_path = getattr(args, "config", None) or default_config_path()
    if hint := reporter_token_hint(settings, config_path, args.token_file):
        print(hint)
    return 0


def _register_served(settings: Settings, token: str, *, force: bool) -> None:
    """Register the served host names (``jobs.slurm_hosts``) that have no registration yet
    (all of them with ``--force``). Raises AgentError (exit 1) when one fails."""
    from argus_agent.errors import AgentError
    from argus_agent.jobs.slurm_cli import SlurmUnavailable
    from argus_agent.servedhosts import register_configured, served_path

    try:
        names, made, failed = asyncio.run(register_configured(settings, token, force=force))
    except SlurmUnavailable as exc:
        raise AgentError(f"cannot list the served nodes: {exc}") from None
    print(
        f"served host names: {len(names)}; registered now: {len(made)}; saved to "
        f"{served_path(settings.token_path)} (mode 0600)"
    )
    if failed:
        first = next(iter(sorted(failed.items())))
        raise AgentError(
            f"{len(failed)} served host name(s) could not be registered, e.g. {first[0]}: "
            f"{first[1]}; run `argus-agent register` again"
        )


def _cmd_status(settings: Settings, *, as_json: bool) -> int:
    """Exit 0 healthy, 1 degraded (``statuscheck.health_verdict``), 2 no agent answers
    (AgentNotAnswering's exit code, with its one line on stderr)."""
    from argus_agent import statuscheck
    from argus_agent.control import SOCKET_NAME

    try:
        status = statuscheck.ask_status(settings.agent.state_dir / SOCKET_NAME)
    except statuscheck.AgentNotAnswering as exc:
        if as_json:  # a monitoring system parsing stdout still gets a document
            print(json.dumps(statuscheck.unreachable_document(exc), indent=2))
        raise
    verdict = statuscheck.health_verdict(status)
    if as_json:
        print(json.dumps(statuscheck.json_document(status, verdict), indent=2))
    else:
        print(views.format_status(status, verdict))
    return verdict.code


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (the sampler keeps a /proc file open
    per job process; systemd's default soft limit is 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 1 << 20), hard))


def _cmd_run(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    from argus_agent.daemon import Agent
    from argus_agent.reload import Reloader

    _raise_fd_limit()

    async def _main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        received: list[int] = []

        def _on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                log.info(
                    "signal received; stopping (send again to stop at once)",
                    signal=signal.Signals(signum).name,
                )
                shutdown.set()
            else:
                log.warning("second signal; exiting at once")
                os._exit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, signum)
        agent = Agent(settings)
        # SIGHUP (`systemctl reload`): re-read the config, apply what can change at run time.
        reloader = Reloader(agent, reload_settings)
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        try:
            await agent.run(shutdown)
        finally:
            await reloader.close()

    asyncio.run(_main())
    return 0


def _cmd_dev_server(args: argparse.Namespace) -> int:
    try:
        from argus_agent.devserver import serve
    except ImportError as exc:
        raise ConfigError(
            "the reference server needs the 'server' extra: "
            f"pip install '/path/to/argus-agent-checkout[server]' ({exc})"
        ) from None
    configure("info")
    try:
        serve(
            args.host,
            args.port,
            args.db,
            args.user,
            args.poll_interval,
            websocket=args.websocket,
            rate_limit=args.rate_limit,
            frame_worker=args.frame_worker and (os.cpu_count() or 1) >= 2,
        )
    except OSError as exc:
        import errno
        import socket

        bind_errors = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
        if not isinstance(exc, socket.gaierror) and exc.errno not in bind_errors:
            raise
        # The port is taken, or the address is not this host's: the options are wrong.
        raise ConfigError(
            f"dev-server: cannot listen on {args.host} port {args.port}: "
            f"{exc.strerror or exc}; choose another --host or --port (--port 0 picks a free one)"
        ) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
