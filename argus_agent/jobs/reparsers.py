"""The programs that may parse their arguments as shell code, and the check that refuses them.

This module owns the denylist half of :func:`argus_agent.jobs.cmdline.check_appendable`: the
data (:data:`SHELL_CODE_RUNNERS`, the :data:`WRAPPERS` that are looked through and how each one
finds the program it runs, :data:`NAME_CHANGERS`) and :func:`check_program`, which refuses the
last command unless its program, and every program a wrapper in front of it may run, takes its
arguments as data. It cannot be complete: see ``cmdline``'s module docstring for what it cannot
know. Pure functions: no I/O, no processes.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from argus_agent.jobs.shscan import MAX_NESTING, Token, literal_word, refuse

#: Programs that may run their arguments as shell code (or as code that can run programs), so
#: they are refused as the program of the last command, under any path and in any letter case.
#: A denylist on top of the lexical check: see cmdline's docstring for what it cannot know.
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
#: Programs that, run anywhere in the command, can change what a later command name runs.
NAME_CHANGERS = frozenset({"alias", "hash", "enable", "autoload", "functions", "zmodload"})
_VERSION_SUFFIX = re.compile(r"(?:[-._]?(?:[0-9][0-9.]*|static))+$")


def normal_name(word: str) -> str:
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


def check_program(command: list[Token]) -> None:
    """Refuse unless the program of ``command`` (a simple command's words from its program on)
    takes its arguments as data, looking through wrappers."""
    _check_program(command, 0, via=None, walk=_Walk())


def _check_program(
    words: list[Token], i: int, via: str | None, walk: _Walk, depth: int = 0
) -> None:
    """Refuse unless ``words[i]`` names a program that takes its arguments as data, looking
    through wrappers; ``via`` is the wrapper that runs it."""
    what = "its program" if via is None else f"the program that {via} runs"
    if i in walk.checked:
        return
    walk.checked.add(i)
    if depth > MAX_NESTING:
        refuse("its wrappers are nested too deeply")
    if i >= len(words):
        refuse(f"{via} would run the first override as its program")
    word = literal_word(words[i])
    if word is None:
        refuse(f"{what} is not a literal word, so it could be a shell")
    name = normal_name(word)
    first = literal_word(words[i + 1]) if i + 1 < len(words) else None
    if name in _SCRIPT_SHELLS and first and not first.startswith(("-", "+")):
        return  # `sh script.sh ARGS`: the overrides are the script's "$@"
    if name == "printf" and first and _SAFE_PRINTF.fullmatch(first):
        return  # `printf '%s\n' ARGS`: they are only printed
    if name in SHELL_CODE_RUNNERS:
        refuse(f"{what} is {name}, which can run its arguments as shell code")
    if name in _NO_PYTHON_LAUNCHERS or name == "deepspeed":
        args = [(literal_word(t) or "").partition("=")[0] for t in words[i + 1 :]]
        if "--no-python" in args or "--no_python" in args:
            refuse(f"{what} is {name} with --no-python, which runs a program we cannot check")
        options = itertools.takewhile(lambda a: not a.endswith(".py"), args)
        if name == "deepspeed" and not _DEEPSPEED_MULTINODE.isdisjoint(options):
            refuse(f"{what} is deepspeed on several nodes, which passes them through a shell")
    spec = WRAPPERS.get(name)
    if spec is not None:
        starts = _wrapped_programs(name, spec, words, i + 1, walk)
        for j in sorted(starts):
            # j == len(words): the first override would be the program.
            _check_program(words, j, via=name, walk=walk, depth=depth + 1)


def _wrapped_programs(
    name: str, spec: Wrapper, words: list[Token], i: int, walk: _Walk
) -> set[int]:
    """Every index of ``words`` at which the program that the wrapper ``name`` runs may start.

    Options the wrapper is not known to give no argument to are tried with and without one
    (``unknown_takes`` words at most), so a word that might be the program is always checked.
    """
    if spec.several and any(t.literal == ":" for t in words[i:]):
        refuse(f"{name} runs several programs (':'), so the last one is unclear")
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
            refuse(f"cannot tell which program {name} runs, as its wrappers are too many")
        j, operands, done, needed = state
        if j >= len(words):
            starts.add(j)  # refused by the caller once the others are checked
            continue
        word = literal_word(words[j])
        if word is None:
            refuse(f"cannot tell which program {name} runs, as its arguments are not literal")
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
            refuse(f"{name} without {' or '.join(sorted(spec.needs))} runs a shell")
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
            refuse(f"{name} {option} runs a shell command line")
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
        refuse(f"{name} {shell} runs a shell command line")
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
