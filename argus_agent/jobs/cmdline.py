"""The argv that relaunches a recorded command with overrides, and whether it can be built.

This module owns one decision: how a rerun's ``key=value`` overrides reach the recorded command.
The recorded command is shell text; the override values are not, and must never be parsed as
such. Quoting them into the text (``shlex.quote``) is only right for a POSIX shell, and even
there it goes wrong when the text ends inside an open quote, after a backslash, in a comment or
after an operator: the overrides get swallowed, misplaced, or run as code.

So nothing is pasted. The script becomes ``<command> "$@"`` and the rendered words are handed to
the shell as positional parameters after ``$0``; ``"$@"`` expands to exactly those words. That is
only right when ``"$@"`` lands as the trailing arguments of the command's last simple command,
which :func:`check_appendable` verifies with a small, deliberately conservative POSIX-sh scanner.
Whatever the scanner cannot vouch for is refused with a PayloadError whose message is shown to
the user who asked for the rerun; a rerun without overrides still runs the command unchanged.

Landing as arguments is not enough: the program that receives them may parse them as shell code
itself (``eval``, ``sh -c``, ``ssh host cmd``, bash's ``declare``/``let``/``printf -v`` with
``a[$(...)]`` subscripts, ...). So the last command must also pass, fail closed:

* its program word is a literal word (no ``$``, backquote, glob, brace or bare ``~``), since
  ``E=eval; $E cmd`` or ``/bin/ba* -c`` can name any program;
* the program's basename is not in :data:`SHELL_CODE_RUNNERS`, a denylist of known re-parsers;
  a POSIX shell is allowed only as ``sh script.sh ARGS`` (no options, a literal script), and
  ``printf`` only after a literal format of ``%s``-like conversions;
* a known wrapper (:data:`WRAPPERS`: ``nohup``, ``env``, ``timeout``, ``sudo``, ``srun``, ...)
  is looked through: its options and operands are skipped (an option it may or may not give an
  argument to is tried both ways) and the same test applies to every word that could be the
  program it runs; where that cannot be told (a non-literal word, ``env -S``, no program left)
  the command is refused;
* it starts with no keyword but ``!``, ``{``, ``if``/``then``/``else``/``elif``,
  ``while``/``until``/``do`` (zsh's ``repeat 3 eval``, ``if [[ x ]] eval``), and no ``)`` is
  glued before it (``@(bash) -c``, zsh's ``/bin/ba(sh) -c``);
* the command nowhere reads the shell's positional parameters (``$1``, ``"$@"``, ``getopts``,
  ``for x; do``, ``${!n}``, zsh's ``$argv``), which hold the overrides for every command, not
  only the last, even inside single quotes (an earlier ``eval``/``trap`` may run that text),
  and runs no ``alias``/``hash``/``enable``, which can make a harmless name run a shell.

This is a denylist on top of the lexical check, and it cannot be complete. It cannot know a
program that re-parses its arguments internally: a Python script that passes ``sys.argv`` to
``os.system``, a shell script doing ``eval "$@"``, a renamed or symlinked shell, a wrapper or
launcher missing from the lists (or ``deepspeed``/``accelerate`` reaching other nodes through
``pdsh``/``ssh`` from a default hostfile), functions or aliases from the shell's startup files,
files that ``source``/``.`` read earlier in the command, or an earlier ``eval`` of text built
at run time that reads ``$1``. Pure functions: no I/O, no processes.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from argus_agent.errors import PayloadError

OverrideValue = str | int | float | bool | None

#: Basenames of ``jobs.shell[0]`` that run ``-c SCRIPT NAME ARGS...`` with ARGS as ``"$@"``.
POSIX_SHELLS = frozenset({"sh", "bash", "dash", "ksh", "mksh", "zsh", "ash"})

#: Words that open, continue or close compound commands (POSIX, bash, zsh). The scanner refuses
#: them as the last word wherever they stand: quoting the word makes it ordinary again.
RESERVED_WORDS = frozenset(
    {
        "!", "{", "}", "case", "do", "done", "elif", "else", "esac", "fi", "for", "if", "in",
        "then", "until", "while", "[[", "]]", "function", "select", "time", "coproc",
        "foreach", "end", "repeat",
    }
)  # fmt: skip

#: Programs that may run their arguments as shell code (or as code that can run programs), so
#: they are refused as the program of the last command, under any path and in any letter case.
#: A denylist on top of the lexical check: see the module docstring for what it cannot know.
SHELL_CODE_RUNNERS: tuple[str, ...] = (
    # Shells: `sh -c CODE`, or a script read from an override. Allowed only as `sh script.sh`.
    *("sh", "bash", "rbash", "dash", "zsh", "ksh", "mksh", "lksh", "pdksh", "oksh", "ash"),
    *("yash", "posh", "busybox", "toybox", "fish", "csh", "tcsh", "rc", "es", "elvish", "nu"),
    *("xonsh", "pwsh", "powershell"),
    # Builtins that evaluate text, or names with `a[$(...)]` subscripts (bash, ksh, zsh), or
    # arithmetic (`let`, and ksh/zsh's `shift`, `exit`, `test -eq`, `printf %d`...).
    *("eval", "let", "source", ".", "trap", "declare", "typeset", "local", "export"),
    *("readonly", "integer", "float", "private", "nameref", "printf", "print", "read"),
    *("mapfile", "readarray", "unset", "getopts", "wait", "test", "[", "shift", "exit"),
    *("return", "break", "continue", "logout", "ulimit", "compgen", "complete", "fc", "bind"),
    *("enable", "alias", "hash", "emulate", "sched", "zpty", "zargs", "vared", "zparseopts"),
    *("functions", "autoload", "zmodload"),
    # Programs that join their arguments into a command line for a (remote) shell, or read
    # them as code or commands: remote shells, su/sg, watch, xargs/parallel/find, debuggers
    # (gdb and lldb start the program through a shell), make/just (`$(shell ...)`), launchers
    # whose `run` goes through a shell or a script (conda, pixi, hatch, npm...), containers.
    *("ssh", "slogin", "rsh", "autossh", "mosh", "scp", "rsync", "pdsh", "pssh"),
    *("parallel-ssh", "clush", "dsh", "su", "sg", "watch", "xargs", "parallel", "find"),
    *("script", "expect", "unbuffer", "gdb", "lldb", "firejail", "make", "gmake", "bmake"),
    *("just", "conda", "mamba", "pixi", "hatch", "npm", "npx", "yarn", "pnpm", "bun"),
    *("horovodrun", "docker", "podman", "nerdctl", "singularity", "apptainer", "enroot"),
    *("kubectl", "tmux", "screen", "sbatch", "at", "batch"),
)


@dataclass(frozen=True)
class Wrapper:
    """How a program that runs another one (``nohup python t.py``) finds it in its arguments:
    after its options (written as typed: ``-n``, ``--user``, ``-np``) and their arguments, its
    ``operands`` (timeout's DURATION) and, with ``assignments``, its NAME=VALUE words."""

    takes_one: frozenset[str] = frozenset()
    takes_two: frozenset[str] = frozenset()
    no_arg: frozenset[str] = frozenset()
    #: Options that make it run a shell command line instead (``env -S``, ``sudo -s``): refused.
    shell: frozenset[str] = frozenset()
    #: Without one of these options it hands its arguments to a shell (``runuser`` without -u).
    needs: frozenset[str] = frozenset()
    operands: int = 0
    assignments: bool = False
    #: Options may follow the operands (``uv run --with x python``).
    interleaved: bool = False
    #: ``-np`` is one option, not ``-n -p`` (mpirun).
    single_dash_long: bool = False
    #: No option takes the next word as its argument (``valgrind --tool=x``).
    attached_only: bool = False
    #: How many words an option it is not known to take may take.
    unknown_takes: int = 1
    #: ``:`` separates several programs (MPMD): refused, the last one is not the first.
    several: bool = False


def _wrapper(
    one: str = "", two: str = "", no: str = "", shell: str = "", needs: str = "", **kw: Any
) -> Wrapper:
    sets = {"takes_one": one, "takes_two": two, "no_arg": no, "shell": shell, "needs": needs}
    return Wrapper(**{k: frozenset(v.split()) for k, v in sets.items()}, **kw)


_SLURM = _wrapper(
    one="-A -b -c -C -d -D -e -G -i -J -L -m -M -n -N -o -p -q -r -S -t -T -w -W -x "
    "--account --begin --cpus-per-task --constraint --dependency --chdir --error --gpus "
    "--input --job-name --licenses --distribution --clusters --ntasks --nodes --output "
    "--partition --qos --relative --core-spec --time --threads --nodelist --wait --exclude "
    "--gres --gpus-per-node --gpus-per-task --ntasks-per-node --mem --mem-per-cpu "
    "--mem-per-gpu --cpus-per-gpu --export --mpi --cpu-bind --gpu-bind --jobid --reservation "
    "--signal --container --comment --network --tmp --hint --het-group --cpu-freq",
    no="-E -H -I -k -K -l -O -Q -s -u -v -V -X -Z --exclusive --pty --overlap --exact "
    "--unbuffered --label --quiet --verbose --oversubscribe --overcommit --immediate "
    "--no-kill --kill-on-bad-exit --preserve-env --disable-status --no-allocate",
    shell="--multi-prog",
    several=True,
)
_MPI = _wrapper(
    one="-np -n -c -N -H -host --host -hostfile --hostfile -machinefile --machinefile "
    "-default-hostfile --default-hostfile -x -wdir --wdir -wd -path --path -prefix --prefix "
    "-npernode --npernode -npersocket --npersocket -map-by --map-by -bind-to --bind-to "
    "-rank-by --rank-by -output-filename --output-filename -stdin --stdin -ppr --ppr "
    "-cpus-per-proc --cpus-per-proc -cpus-per-rank --cpus-per-rank -cpu-set --cpu-set -am "
    "--am -tune --tune -preload-files --preload-files -ppn -hosts -f -iface -bootstrap "
    "-launcher -genvlist -envlist",
    two="-mca --mca -gmca --gmca -genv -env --env -prtemca --prtemca",
    no="-oversubscribe --oversubscribe -allow-run-as-root --allow-run-as-root "
    "-report-bindings --report-bindings -display-map --display-map -tag-output --tag-output "
    "-timestamp-output --timestamp-output -merge-stderr-to-stdout --merge-stderr-to-stdout "
    "-q --quiet -v --verbose -nolocal --nolocal -noprefix --noprefix -genvall -genvnone -l "
    "-prepend-rank -bind-to-core --bind-to-core",
    shell="-app --app -configfile --configfile",
    single_dash_long=True,
    unknown_takes=2,
    several=True,
)

#: Programs that run the program named in their arguments, looked through by the check. Shell
#: builtins and keywords (``command``, ``builtin``, ``exec``, ``time``, zsh's ``noglob``,
#: ``nocorrect`` and ``-``) are here too: ``builtin command eval`` is eval.
WRAPPERS: Mapping[str, Wrapper] = {
    "command": _wrapper(no="-p -v -V"),
    "builtin": _wrapper(),
    "exec": _wrapper(one="-a", no="-c -l"),
    "time": _wrapper(one="-f -o --format --output", no="-p -a -v -q --portability --append"),
    "noglob": _wrapper(),
    "nocorrect": _wrapper(),
    "-": _wrapper(),
    "nohup": _wrapper(),
    "nice": _wrapper(one="-n --adjustment"),
    "timeout": _wrapper(
        one="-k -s --kill-after --signal",
        no="-v --verbose --preserve-status --foreground",
        operands=1,
    ),
    "stdbuf": _wrapper(one="-i -o -e --input --output --error"),
    "env": _wrapper(
        one="-u -C -a --unset --chdir --argv0",
        no="-i -0 -v --ignore-environment --null --debug",
        shell="-S --split-string",
        assignments=True,
    ),
    "sudo": _wrapper(
        one="-u -g -p -C -D -r -t -T -U -c --user --group --prompt --close-from --chdir "
        "--role --type --command-timeout --other-user --login-class",
        no="-A -b -E -H -k -K -n -P -S -B -N --askpass --background --preserve-env "
        "--set-home --reset-timestamp --non-interactive --preserve-groups --stdin --bell",
        shell="-s -i --shell --login",
        assignments=True,
    ),
    "doas": _wrapper(one="-u -C", no="-n -L", shell="-s"),
    "pkexec": _wrapper(one="--user", no="--disable-internal-agent --keep-cwd"),
    "runuser": _wrapper(
        one="-u -g -G -w -s --user --group --supp-group --whitelist-environment --shell",
        no="-m -p -P --preserve-environment --pty",
        shell="-c --command --session-command -l --login -",
        needs="-u --user",
    ),
    "chroot": _wrapper(one="--userspec --groups", no="--skip-chdir", operands=1),
    "setsid": _wrapper(no="-c -f -w --ctty --fork --wait"),
    "taskset": _wrapper(no="-a -p -c --all-tasks --pid --cpu-list", operands=1),
    "numactl": _wrapper(
        one="-i -m -N -C -p -P -w --interleave --membind --cpunodebind --physcpubind "
        "--preferred --preferred-many --weighted-interleave",
        no="-l -a -b --localalloc --all --balancing",
    ),
    "ionice": _wrapper(one="-c -n -p -P -u --class --classdata --pid --pgid --uid", no="-t"),
    "chrt": _wrapper(
        one="-T -P -D --sched-runtime --sched-period --sched-deadline",
        no="-a -b -d -f -i -o -r -R -m -p -v --all-tasks --batch --deadline --fifo --idle "
        "--other --rr --reset-on-fork --max --pid --verbose",
        operands=1,
    ),
    "flock": _wrapper(
        one="-w -E --timeout --wait --conflict-exit-code",
        no="-s -x -e -n -u -o -F --shared --exclusive --nonblock --nb --unlock --close "
        "--no-fork --verbose",
        shell="-c --command",
        operands=1,
        interleaved=True,
    ),
    "prlimit": _wrapper(one="-p --pid", no="-c -d -e -f -i -l -m -n -q -r -s -t -u -v -x -y"),
    "unshare": _wrapper(
        one="-S -G -R -w --setuid --setgid --root --wd --propagation --map-user --map-group "
        "--map-users --map-groups --setgroups",
        no="-m -u -i -n -p -U -C -T -f -r -c --fork --map-root-user --map-current-user "
        "--mount-proc --kill-child",
    ),
    "nsenter": _wrapper(one="-t -S -G --target --setuid --setgid", no="-a -F --all --no-fork"),
    "setpriv": _wrapper(
        one="--reuid --regid --ruid --rgid --euid --egid --groups --inh-caps --ambient-caps "
        "--bounding-set --securebits --selinux-label --apparmor-profile",
        no="-d --dump --nnp --no-new-privs --init-groups --keep-groups --clear-groups --reset-env",
    ),
    "cgexec": _wrapper(one="-g", no="--sticky"),
    "systemd-run": _wrapper(
        one="-u -p -E -M -H --unit --property --setenv --machine --host --description --slice "
        "--uid --gid --working-directory --nice --service-type",
        no="-t -P -G -q -r -d --user --system --scope --pty --pipe --wait --quiet "
        "--remain-after-exit --collect --same-dir --no-block --no-ask-password",
        shell="-S --shell",
    ),
    "xvfb-run": _wrapper(
        one="-e -f -n -p -s -w --error-file --auth-file --server-num --xauth-protocol "
        "--server-args --wait",
        no="-a -l -d --auto-servernum --listen-tcp --auto-display",
    ),
    "valgrind": _wrapper(attached_only=True),
    "strace": _wrapper(
        one="-a -b -e -o -O -p -P -s -S -u -E -X -I -U --trace --signal --status --output "
        "--attach --trace-path --string-limit --summary-sort-by --user --env",
        no="-c -C -d -D -f -F -h -i -k -q -r -t -T -v -V -w -x -y -Y -z -Z --follow-forks "
        "--summary-only --summary --no-abbrev --verbose",
    ),
    "ltrace": _wrapper(
        one="-a -A -e -F -l -n -o -p -s -u -w -x -D", no="-b -c -C -f -i -L -r -S -t -T"
    ),
    "catchsegv": _wrapper(),
    "eatmydata": _wrapper(),
    "tini": _wrapper(one="-e -p", no="-s -v -w -g -l"),
    "dumb-init": _wrapper(one="-r --rewrite", no="-c -v --single-child --verbose"),
    "fakeroot": _wrapper(one="-l -f -s -i -b --lib --faked", no="-u --unknown-is-real"),
    "sshpass": _wrapper(one="-f -d -p -P", no="-e -v"),
    "srun": _SLURM,
    "salloc": _SLURM,
    "mpirun": _MPI,
    "mpiexec": _MPI,
    "mpiexec.hydra": _MPI,
    "orterun": _MPI,
    "prterun": _MPI,
    # `uv run`, `poetry run`, `pipenv run`, `perf stat`, `nsys profile`: the subcommand is the
    # operand (whatever it is: another one only gets the overrides as its own arguments).
    "uv": _wrapper(
        one="-p -w --python --with --with-requirements --env-file --directory "
        "--project --package --extra --group --index --index-url --extra-index-url",
        operands=1,
        interleaved=True,
    ),
    "poetry": _wrapper(one="-C -P --directory --project", operands=1, interleaved=True),
    "pipenv": _wrapper(operands=1, interleaved=True),
    "perf": _wrapper(one="-e -o -p -t -C -c -F -G -r -j", operands=1, interleaved=True),
    "nsys": _wrapper(
        one="-o -t -s -d -w -y -c -p -e -b -x -f -n --output --trace --sample "
        "--duration --delay --capture-range --env-var --force-overwrite",
        operands=1,
        interleaved=True,
    ),
    "ncu": _wrapper(
        one="-o -k -c -s --set --section --metrics --kernel-name --launch-count "
        "--launch-skip --export --target-processes --replay-mode"
    ),
}

#: Shells that read the first operand as a script file when it comes before any option.
_SCRIPT_SHELLS = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "mksh", "lksh", "pdksh", "oksh", "ash", "yash", "posh"}
)
#: A printf format whose conversions print their argument as text (no arithmetic, no ``*``).
_SAFE_PRINTF = re.compile(r"(?!-)(?:[^%]|%%|%[-+ #0']*[0-9]*(?:\.[0-9]*)?[sbcq])*")
#: Python launchers that run their "script" as a program of its own under ``--no-python``.
_NO_PYTHON_LAUNCHERS = frozenset({"torchrun", "deepspeed", "accelerate", "python", "pypy"})
#: deepspeed options that make it start the script on other nodes through pdsh/ssh, whose
#: remote command line is the script's arguments joined for a shell.
_DEEPSPEED_MULTINODE = frozenset({"-H", "--hostfile", "--launcher", "--ssh_port"})
#: Keywords that may stand before a simple command (others: `[[`, zsh's `repeat N`, ...).
_COMMAND_PREFIX_KEYWORDS = frozenset(
    {"!", "{", "if", "then", "else", "elif", "while", "until", "do"}
)
#: Programs that, run anywhere in the command, can change what a later command name runs.
_NAME_CHANGERS = frozenset({"alias", "hash", "enable", "autoload", "functions", "zmodload"})
#: Positional parameters, which hold the overrides for the whole script: `$1`, `$@`, `${#@}`,
#: zsh's `${(q)@}`, `$argv` and `${(P)n}`, bash's `${!n}` and BASH_ARGV, `getopts`, and
#: `for x; do` / `select x; do` without `in`. Matched in the raw text, quotes or not: an earlier
#: `eval` or `trap` may run single-quoted text.
_POSITIONAL = re.compile(
    r"\$(?:[1-9@*]|\{(?:\([^)]*\))?[#!^=~+]*(?:[1-9@*]|argv\b))"
    r"|\$\{!|\$\{\([^)]*P|(?<![\w.])argv\b|BASH_ARGV|BASH_ARGC|(?<![\w-])getopts\b"
    r"|(?<![\w-])(?:for|select)(?:\s+(?!in\b)[A-Za-z_]\w*)+\s*(?:;|&|\n|\{|\bdo\b|$)"
)
_VERSION_SUFFIX = re.compile(r"(?:[-._]?(?:[0-9][0-9.]*|static))+$")

_BLANKS = " \t"
_METACHARS = " \t\n;&|<>()"
#: Longest first. ``&>``, ``|&``, ``;&`` and ``<<<`` are deliberately not here: dash reads them
#: as two operators, and splitting them is the reading that refuses more.
_OPERATORS = (
    *("<<-", "&&", "||", ";;", "<<", ">>", "<&", ">&", "<>", ">|"),
    *(";", "&", "|", "<", ">", "(", ")"),
)
_REDIRECTIONS = frozenset({"<", ">", ">>", "<&", ">&", "<>", ">|", "<<", "<<-"})
_HERE_DOCUMENTS = frozenset({"<<", "<<-"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
_FD_PREFIX = re.compile(r"[0-9]+|\{[A-Za-z_][A-Za-z0-9_]*\}")
_MAX_NESTING = 32

_ADVICE = "rerun without overrides to run it exactly as recorded"


def render_override(key: str, value: OverrideValue) -> str:
    """One ``key=value`` word (unquoted), Hydra style: ``true``/``false``, ``null``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return f"{key}={text}"


def check_appendable(command: str) -> None:
    """Raise PayloadError unless ``command + ' "$@"'`` passes ``"$@"`` as the trailing
    arguments of the command's last simple command, in any POSIX-family shell, and that
    command's program is not known to run its arguments as shell code (module docstring)."""
    try:
        tokens = _Scanner(command, top=True).script()
        _check_tail(tokens)
        _check_earlier(tokens, command)
    except _Refusal as refusal:
        raise PayloadError(
            f"overrides cannot be added to the recorded command: {refusal.why}; {_ADVICE}"
        ) from None


def posix_shell_name(shell: Sequence[str]) -> str:
    """``$0`` for the job's shell (basename of ``shell[0]``); PayloadError unless ``shell`` is a
    POSIX-family shell whose last element is ``-c``, so the script comes right after it."""
    name = os.path.basename(shell[0]) if shell else ""
    if name not in POSIX_SHELLS or len(shell) < 2 or shell[-1] != "-c" or "-c" in shell[1:-1]:
        raise PayloadError(
            "overrides need a POSIX shell in jobs.shell (sh, bash, dash, ksh, mksh, zsh or ash, "
            f"ending in -c, e.g. ['/bin/sh', '-c']); this agent has {list(shell)!r}; {_ADVICE}"
        )
    return name


def build_argv(
    shell: Sequence[str], command: str, overrides: Mapping[str, Any]
) -> tuple[tuple[str, ...], str]:
    """(argv to execute, the line to show) for ``command`` run by ``shell`` with ``overrides``.

    Without overrides: ``(*shell, command)`` and ``command``. With overrides the script is
    ``command "$@"`` and the rendered words follow ``$0`` as positional parameters, so they reach
    the command verbatim and no shell parses them. The display line (logs, audit, what the Argus
    UI previews) is ``command`` plus each word shell-quoted; it is never executed.
    Raises PayloadError (see :func:`check_appendable`, :func:`posix_shell_name`).
    """
    if not overrides:
        return (*shell, command), command
    words = [render_override(key, value) for key, value in overrides.items()]
    check_appendable(command)
    name = posix_shell_name(shell)
    argv = (*shell, command + ' "$@"', name, *words)
    return argv, " ".join([command, *(shlex.quote(word) for word in words)])


class _Refusal(Exception):
    """The scanner cannot vouch for the command; ``why`` completes "cannot be added: ..."."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _refuse(why: str) -> NoReturn:
    raise _Refusal(why)


@dataclass(frozen=True)
class _Token:
    """An operator (``op``) or a word: its text as written and, when it has no expansion, its
    value after quote removal (``literal``). ``fd`` marks ``2`` in ``2>x``."""

    text: str
    op: bool = False
    literal: str | None = None
    fd: bool = False
    #: An unquoted glob or brace character (``* ? [ {``): the word may become other words.
    pattern: bool = False


class _Scanner:
    """Tokens of a POSIX-sh script, refusing whatever it cannot read with certainty.

    ``top``: the recorded command itself, where a newline, a comment or a line continuation is
    refused. Otherwise the text of a ``$(...)`` (``closer`` is ``)``) or of a backquoted
    substitution (the whole text), whose own separators and comments are harmless.
    """

    def __init__(self, text: str, *, top: bool = False, depth: int = 0):
        self.s = text
        self.i = 0
        self.top = top
        self.depth = depth
        if depth > _MAX_NESTING:
            _refuse("its substitutions are nested too deeply")

    def _at(self, offset: int = 0) -> str:
        j = self.i + offset
        return self.s[j] if j < len(self.s) else ""

    def script(self, closer: str | None = None) -> list[_Token]:
        """Tokens up to the end of the text, or up to (and past) the matching ``closer``."""
        tokens: list[_Token] = []
        parens = 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in _BLANKS:
                self.i += 1
            elif c == "\n":
                if self.top:
                    _refuse("it spans several lines")
                tokens.append(_Token("\n", op=True))
                self.i += 1
            elif c == "#":  # only reached at the start of a token
                if self.top:
                    _refuse("it ends with a # comment, which would swallow them")
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            elif c == "\\" and self._at(1) == "\n":
                if self.top:
                    _refuse("it spans several lines")
                self.i += 2
            elif op := next((o for o in _OPERATORS if self.s.startswith(o, self.i)), None):
                if op in _HERE_DOCUMENTS:
                    _refuse(f"it contains a here-document ({op})")
                self.i += len(op)
                if closer is not None and op == "(":
                    parens += 1
                elif closer is not None and op == ")":
                    if parens == 0:
                        return tokens
                    parens -= 1
                tokens.append(_Token(op, op=True))
            else:
                word = self._word()
                if not self.top and word.text == "case":
                    _refuse("it has a case statement inside a command substitution")
                tokens.append(word)
        if closer is not None:
            _refuse("it ends inside an unterminated $(...)")
        return tokens

    def _word(self) -> _Token:
        start = self.i
        literal: list[str] | None = []
        pattern = False
        while self.i < len(self.s) and (c := self.s[self.i]) not in _METACHARS:
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    _refuse("it ends with a backslash")
                if nxt == "\n" and self.top:
                    _refuse("it spans several lines")
                if literal is not None and nxt != "\n":
                    literal.append(nxt)
                self.i += 2
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    _refuse("it ends inside an unterminated ' quote")
                if literal is not None:
                    literal.append(self.s[self.i + 1 : end])
                self.i = end + 1
            elif c == '"':
                self.i += 1
                text = self._double_quoted()
                literal = None if literal is None or text is None else [*literal, text]
            elif c == "$":
                self._dollar(in_quotes=False)
                literal = None
            elif c == "`":
                self._backquoted(in_quotes=False)
                literal = None
            else:
                # `[` is the test command unless a `]` follows (anywhere: `[a' ']` is a pattern).
                pattern = pattern or c in "*?{" or (c == "[" and "]" in self.s[self.i :])
                if literal is not None:
                    literal.append(c)
                self.i += 1
        text = self.s[start : self.i]
        fd = self._at() in ("<", ">") and _FD_PREFIX.fullmatch(text) is not None
        value = None if literal is None else "".join(literal)
        return _Token(text, literal=value, fd=fd, pattern=pattern)

    def _double_quoted(self) -> str | None:
        """Past the closing ``"``; the quoted value, or None if it has expansions."""
        value: list[str] | None = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return None if value is None else "".join(value)
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    break
                if value is not None and nxt != "\n":
                    value.append(nxt if nxt in '$`"\\' else c + nxt)
                self.i += 2
            elif c == "$":
                self._dollar(in_quotes=True)
                value = None
            elif c == "`":
                self._backquoted(in_quotes=True)
                value = None
            else:
                if value is not None:
                    value.append(c)
                self.i += 1
        _refuse('it ends inside an unterminated " quote')

    def _dollar(self, *, in_quotes: bool) -> None:
        nxt = self._at(1)
        if nxt == "(":
            self.i += 2
            inner = _Scanner(self.s, depth=self.depth + 1)
            inner.i = self.i
            inner.script(closer=")")
            self.i = inner.i
        elif nxt == "{":
            self.i += 2
            self._parameter(in_quotes=in_quotes)
        elif nxt == "'" and not in_quotes:
            _refuse("it uses $'...' quoting, which POSIX shells read differently")
        else:  # $name, $1, $?, or $"..." (whose quotes the caller reads next)
            self.i += 1

    def _parameter(self, *, in_quotes: bool) -> None:
        """Past the ``}`` closing a ``${``."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "}":
                self.i += 1
                return
            if c in "'\"" and in_quotes:
                _refuse(
                    "it has quotes inside a double-quoted ${...}, which shells read differently"
                )
            if c == "\\":
                if not self._at(1):
                    break
                self.i += 2
            elif c == "'":
                end = self.s.find("'", self.i + 1)
                if end < 0:
                    break
                self.i = end + 1
            elif c == '"':
                self.i += 1
                self._double_quoted()
            elif c == "$":
                self._dollar(in_quotes=in_quotes)
            elif c == "`":
                self._backquoted(in_quotes=in_quotes)
            else:
                self.i += 1
        _refuse("it ends inside an unterminated ${...}")

    def _backquoted(self, *, in_quotes: bool) -> None:
        """Past the closing backquote: the first one not escaped, whatever the quotes."""
        self.i += 1
        inner: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "`":
                self.i += 1
                _Scanner("".join(inner), depth=self.depth + 1).script()
                return
            if c == "\\":
                nxt = self._at(1)
                if not nxt:
                    break
                special = nxt in "$`\\" or (in_quotes and nxt == '"')
                inner.append(nxt if special else c + nxt)
                self.i += 2
            else:
                inner.append(c)
                self.i += 1
        _refuse("it ends inside an unterminated `...` substitution")


def _check_tail(tokens: list[_Token]) -> None:
    """Refuse unless the last token is a word ending a simple command that runs a program that
    takes its arguments as data."""
    if not tokens:
        _refuse("it is empty")
    last = tokens[-1]
    if last.op:
        _refuse(f"it ends with {last.text!r}, so they would not be arguments of its last command")
    if last.text in RESERVED_WORDS:
        _refuse(f"it ends with the shell keyword {last.text!r} (quote it if it is an argument)")
    start = max(
        (n + 1 for n, t in enumerate(tokens) if t.op and t.text not in _REDIRECTIONS), default=0
    )
    command: list[_Token] = []  # the program and its arguments, redirections left out
    keywords: list[str] = []
    target = False
    for token in tokens[start:]:
        if token.op:
            target = True
        elif target or token.fd:
            target = False
        elif command:
            command.append(token)
        elif token.text in RESERVED_WORDS and token.text != "time":
            keywords.append(token.text)
        elif assignment := _ASSIGNMENT.match(token.text):
            if assignment.group(1):
                _refuse(
                    "it assigns an array element before its program, which dash reads as a pattern"
                )
        else:
            command.append(token)
    if not command:
        _refuse("its last command runs no program (only assignments or redirections)")
    if start and tokens[start - 1].text in ("(", ")"):
        # `(a) b`, `@(bash) -c`, zsh's `/bin/ba(sh)`: the program may be glued to a pattern.
        _refuse(f"its last command follows {tokens[start - 1].text!r}, so its program is unclear")
    if bad := next((k for k in keywords if k not in _COMMAND_PREFIX_KEYWORDS), None):
        _refuse(f"its last command starts with the shell keyword {bad!r}")
    _check_program(command, 0, via=None, walk=_Walk())


def _check_earlier(tokens: list[_Token], command: str) -> None:
    """Refuse what lets commands before the last one see or redirect the overrides."""
    for words in _simple_commands(tokens):
        name = _literal_word(words[0])
        if name is not None and _normal_name(name) in _NAME_CHANGERS:
            _refuse(f"it runs {_normal_name(name)}, which can change what a command name runs")
    if found := _POSITIONAL.search(command):
        _refuse(
            f"it reads the shell's positional parameters ({found.group().strip()!r}), "
            "which would hold them"
        )


def _simple_commands(tokens: list[_Token]) -> list[list[_Token]]:
    """The words of each top-level simple command from its program on (redirections out)."""
    commands: list[list[_Token]] = []
    current: list[_Token] = []
    target = False
    for token in [*tokens, _Token(";", op=True)]:
        if token.op and token.text not in _REDIRECTIONS:
            if current:
                commands.append(current)
            current, target = [], False
        elif token.op:
            target = True
        elif target or token.fd:
            target = False
        elif current or not (token.text in RESERVED_WORDS or _ASSIGNMENT.match(token.text)):
            current.append(token)
    return commands


def _literal_word(token: _Token) -> str | None:
    """The word's one value, or None when expansions could make it another word or several."""
    if token.literal is None or token.pattern:
        return None
    if token.text.startswith("~") and "/" not in token.literal:  # `~` or `~user`: a home
        return None
    return token.literal


def _normal_name(word: str) -> str:
    """The basename a program word runs, as compared with the lists: lower case (macOS), no
    zsh ``=cmd`` prefix, no ``.exe`` or version/static suffix (``ksh93``, ``bash-static``)."""
    name = os.path.basename(word.lstrip("=")).lower().removesuffix(".exe")
    return _VERSION_SUFFIX.sub("", name) or name


@dataclass
class _Walk:
    """The words already checked as programs, and how many more steps the wrappers may take
    (the check stays linear in the length of the command, however its wrappers are nested)."""

    checked: set[int] = field(default_factory=set)
    steps: int = 20_000


def _check_program(
    words: list[_Token], i: int, via: str | None, walk: _Walk, depth: int = 0
) -> None:
    """Refuse unless ``words[i]`` names a program that takes its arguments as data, looking
    through wrappers; ``via`` is the wrapper that runs it."""
    what = "its program" if via is None else f"the program that {via} runs"
    if i in walk.checked:
        return
    walk.checked.add(i)
    if depth > _MAX_NESTING:
        _refuse("its wrappers are nested too deeply")
    if i >= len(words):
        _refuse(f"{via} would run the first override as its program")
    word = _literal_word(words[i])
    if word is None:
        _refuse(f"{what} is not a literal word, so it could be a shell")
    name = _normal_name(word)
    first = _literal_word(words[i + 1]) if i + 1 < len(words) else None
    if name in _SCRIPT_SHELLS and first and not first.startswith(("-", "+")):
        return  # `sh script.sh ARGS`: the overrides are the script's "$@"
    if name == "printf" and first and _SAFE_PRINTF.fullmatch(first):
        return  # `printf '%s\n' ARGS`: they are only printed
    if name in SHELL_CODE_RUNNERS:
        _refuse(f"{what} is {name}, which can run its arguments as shell code")
    if name in _NO_PYTHON_LAUNCHERS or name == "deepspeed":
        args = [(_literal_word(t) or "").partition("=")[0] for t in words[i + 1 :]]
        if "--no-python" in args or "--no_python" in args:
            _refuse(f"{what} is {name} with --no-python, which runs a program we cannot check")
        options = itertools.takewhile(lambda a: not a.endswith(".py"), args)
        if name == "deepspeed" and not _DEEPSPEED_MULTINODE.isdisjoint(options):
            _refuse(f"{what} is deepspeed on several nodes, which passes them through a shell")
    spec = WRAPPERS.get(name)
    if spec is not None:
        starts = _wrapped_programs(name, spec, words, i + 1, walk)
        for j in sorted(starts):
            # j == len(words): the first override would be the program.
            _check_program(words, j, via=name, walk=walk, depth=depth + 1)


def _wrapped_programs(
    name: str, spec: Wrapper, words: list[_Token], i: int, walk: _Walk
) -> set[int]:
    """Every index of ``words`` at which the program that the wrapper ``name`` runs may start.

    Options the wrapper is not known to give no argument to are tried with and without one
    (``unknown_takes`` words at most), so a word that might be the program is always checked.
    """
    if spec.several and any(t.literal == ":" for t in words[i:]):
        _refuse(f"{name} runs several programs (':'), so the last one is unclear")
    starts: set[int] = set()
    seen: set[tuple[int, int, bool, bool]] = set()
    todo = collections.deque([(i, spec.operands, False, not spec.needs)])
    while todo:
        state = todo.popleft()
        if state in seen:
            continue
        seen.add(state)
        walk.steps -= 1
        if walk.steps < 0:
            _refuse(f"cannot tell which program {name} runs, as its wrappers are too many")
        j, operands, done, needed = state
        if j >= len(words):
            starts.add(j)  # refused by the caller once the others are checked
            continue
        word = _literal_word(words[j])
        if word is None:
            _refuse(f"cannot tell which program {name} runs, as its arguments are not literal")
        if not done and word == "--":
            todo.append((j + 1, operands, True, needed))
        elif not done and word.startswith("-"):
            counts, is_needed = _option(name, spec, word)
            todo.extend((j + 1 + n, operands, done, needed or is_needed) for n in counts)
        elif spec.assignments and "=" in word[1:]:
            todo.append((j + 1, operands, done, needed))
        elif operands:
            todo.append((j + 1, operands - 1, not spec.interleaved, needed))
        elif not needed:
            _refuse(f"{name} without {' or '.join(sorted(spec.needs))} runs a shell")
        else:
            starts.add(j)
    return starts


def _option(name: str, spec: Wrapper, word: str) -> tuple[range, bool]:
    """How many of the next words the option ``word`` may take, and whether it is one that
    ``spec.needs``. Refuses an option that makes the wrapper run a shell command line."""
    unknown = range(spec.unknown_takes + 1)
    if word == "-" or word.startswith("--") or spec.single_dash_long:
        option, equals, _ = word.partition("=")
        if option in spec.shell:
            _refuse(f"{name} {option} runs a shell command line")
        needed = option in spec.needs
        if equals or spec.attached_only or option in spec.no_arg or option == "-":
            return range(1), needed
        if option in spec.takes_one:
            return range(1, 2), needed
        if option in spec.takes_two:
            return range(2, 3), needed
        return unknown, needed
    letters = ["-" + letter for letter in word[1:]]
    if shell := next((o for o in letters if o in spec.shell), None):
        _refuse(f"{name} {shell} runs a shell command line")
    needed = False
    for n, option in enumerate(letters):
        needed = needed or option in spec.needs
        if option[1].isdigit() or option in spec.no_arg:
            continue
        attached = n + 1 < len(letters)  # `-n4`: the rest of the word is the argument
        if spec.attached_only or (attached and option in spec.takes_one):
            return range(1), needed
        if option in spec.takes_one:
            return range(1, 2), needed
        return unknown, needed
    return range(1), needed
