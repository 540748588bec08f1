"""argus_agent.jobs.cmdline: overrides reach the recorded command verbatim, through a real shell,
and commands they cannot be appended to are refused."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from argus_agent.errors import PayloadError
from argus_agent.jobs.cmdline import build_argv, check_appendable, render_override

SH = ["/bin/sh", "-c"]
PRINT_ARGS = "printf '%s\\0'"  # printf repeats its format per argument: NUL-separated argv
HOSTILE = [
    '$(touch M)"\\',
    "$(touch M)",
    "`touch M`",
    "'; touch M; '",
    '"; touch M; "',
    "a\nb; touch M",
    "*",
    "~",
    "-x",
    "${HOME}",
    'it\'s a "b" \\ c',
    "",
    " ",
    "\\",
]
OTHER_SHELLS = [
    path for path in ("/bin/dash", "/bin/bash", "/bin/zsh", "/bin/ksh", "/bin/mksh")
    if os.path.exists(path)
]  # fmt: skip


def run(argv: Sequence[str], cwd: Path) -> list[bytes]:
    """Run argv (no shell of ours in between) and split its output on NUL."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\0")
    return done.stdout.split(b"\0")[:-1]


def rendered(overrides: Mapping[str, Any]) -> list[bytes]:
    return [os.fsencode(render_override(k, v)) for k, v in overrides.items()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cmdline")


# -- the property: whatever the values, the command sees exactly the rendered words ----------

keys = st.from_regex(r"[A-Za-z_+~][A-Za-z0-9_.\-/@+]{0,255}", fullmatch=True)
nasty_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\n'\"\\$`(){}[]*?~#;&|<>=!%-")),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    ),
    max_size=60,
)
values = st.one_of(
    nasty_text,
    st.sampled_from(HOSTILE),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(overrides=st.dictionaries(keys, values, min_size=1, max_size=6))
def test_overrides_reach_the_command_verbatim(overrides: dict[str, Any], workdir: Path) -> None:
    argv, _ = build_argv(SH, PRINT_ARGS, overrides)
    assert run(argv, workdir) == rendered(overrides)
    assert list(workdir.iterdir()) == []  # nothing ran but printf


@pytest.mark.parametrize("shell", OTHER_SHELLS)
def test_other_posix_shells_pass_hostile_values_verbatim(shell: str, tmp_path: Path) -> None:
    overrides = {f"k{n}": value for n, value in enumerate(HOSTILE)} | {"+x~/a@b": True}
    argv, _ = build_argv([shell, "-c"], PRINT_ARGS, overrides)
    assert argv[-len(overrides) - 1] == os.path.basename(shell)  # $0
    assert run(argv, tmp_path) == rendered(overrides)
    assert list(tmp_path.iterdir()) == []


# -- the last command's program must not run its arguments as shell code --------------------

BASH = ["/bin/bash", "-c"]
TOUCH = {"x": "$(touch M)"}  # the word `x=$(touch M)`
ARITHMETIC = {"x": "a[$(touch M)]"}  # bash evaluates `a[...]` subscripts, $(...) included
SUBSCRIPT_KEY = {"a[$(touch M)]": 1}  # `a[$(touch M)]=1`: policy forbids the key, cmdline may not
SUBSCRIPT_NAME = {"a[$(touch M)": "]"}  # `a[$(touch M)=]`, a valid array element name

#: (shell, command, overrides, why): the argv the old check let through ran `touch M`.
RUNNABLE_EXPLOITS = [
    (SH, "E=eval; $E echo", TOUCH, "not a literal word, so it could be a shell"),
    (SH, 'E=eval; "$E" echo', TOUCH, "not a literal word, so it could be a shell"),
    (SH, "${E:-eval} echo", TOUCH, "not a literal word, so it could be a shell"),
    (SH, "/bin/d?sh -c", TOUCH, "not a literal word, so it could be a shell"),
    (BASH, "{dash,-c}", TOUCH, "not a literal word, so it could be a shell"),
    (BASH, "builtin command eval echo", TOUCH, "that command runs is eval"),
    (SH, "command eval echo", TOUCH, "that command runs is eval"),
    (BASH, "true; let", ARITHMETIC, "is let"),
    (BASH, "declare -i x", ARITHMETIC, "is declare"),
    (BASH, "declare", SUBSCRIPT_KEY, "is declare"),
    (BASH, "typeset", SUBSCRIPT_KEY, "is typeset"),
    (BASH, "read", SUBSCRIPT_NAME, "is read"),
    (BASH, "test -v", SUBSCRIPT_NAME, "is test"),
    (SH, "true; sh -c", TOUCH, "is sh"),
    (SH, "bash -c", TOUCH, "is bash"),
    (SH, "env sh -c", TOUCH, "that env runs is sh"),
    (SH, "env -i -- A=1 sh -c", TOUCH, "that env runs is sh"),
    (SH, "env -S 'sh -c'", TOUCH, "env -S runs a shell"),
    (SH, "xargs -0 sh -c", TOUCH, "is xargs"),
    (SH, "exec sh -c", TOUCH, "that exec runs is sh"),
    (SH, "nohup sh -c", TOUCH, "that nohup runs is sh"),
    (SH, "timeout 60 sh -c", TOUCH, "that timeout runs is sh"),
    (SH, "nice -n 1 sh -c", TOUCH, "that nice runs is sh"),
    (SH, "stdbuf -oL sh -c", TOUCH, "that stdbuf runs is sh"),
    (SH, "setsid -w sh -c", TOUCH, "that setsid runs is sh"),
    (BASH, "time -p sh -c", TOUCH, "that time runs is sh"),
    (SH, "nohup env nice -n 1 timeout 60 bash -c", TOUCH, "that timeout runs is bash"),
    # Earlier commands see the overrides too, as positional parameters.
    (SH, "eval 'eval $1'; true", TOUCH, r"positional parameters \('\$1'\)"),
    (SH, "trap 'eval \"$1\"' EXIT; true", TOUCH, "positional parameters"),
    (SH, 'for x; do eval "$x"; done; true', TOUCH, "positional parameters"),
    (SH, 'f() { eval "$@"; }; f', TOUCH, "positional parameters"),
    (BASH, 'n=1; eval "${!n}"; true', TOUCH, "positional parameters"),
    (BASH, "hash -p /bin/sh python; python -c", TOUCH, "it runs hash"),
]

#: (command, why): refused by reading (remote or privileged, or no override makes them run here).
READ_ONLY_EXPLOITS = [
    ("ssh host python train.py", "is ssh"),
    ("nohup ssh -o BatchMode=yes host python t.py", "that nohup runs is ssh"),
    ("su -c", "is su"),
    ("su - bob -c", "is su"),
    ("watch python t.py", "is watch"),
    ("source", "is source"),
    (".", "is ."),
    ("trap", "is trap"),
    ("printf -v x", "is printf"),
    ("printf '%d'", "is printf"),
    ("printf", "is printf"),
    ("export", "is export"),
    ("readonly", "is readonly"),
    ("local", "is local"),
    ("unset", "is unset"),
    ("[ -v", "is \\["),
    ("exec ssh host", "that exec runs is ssh"),
    ("sudo -u bob sh -c", "that sudo runs is sh"),
    ("sudo A=1 bash -c", "that sudo runs is bash"),
    ("sudo -s python", "sudo -s runs a shell"),
    ("doas sh -c", "that doas runs is sh"),
    ("runuser -u bob -- bash -c", "that runuser runs is bash"),
    ("runuser bob -c", "runuser without"),
    ("chroot /srv sh -c", "that chroot runs is sh"),
    ("taskset 1 sh -c", "that taskset runs is sh"),
    ("numactl -N 0 bash -c", "that numactl runs is bash"),
    ("srun -N 2 bash -c", "that srun runs is bash"),
    ("srun --some-new-option sh -c", "that srun runs is sh"),
    ("mpirun -np 4 sh -c", "that mpirun runs is sh"),
    ("mpirun --some-new-option a b sh -c", "that mpirun runs is sh"),
    ("mpirun -np 1 python t.py : -np 1 sh -c", "several programs"),
    ("flock /tmp/lock -c", "flock -c runs a shell"),
    ("uv run --with x sh -c", "that uv runs is sh"),
    ("timeout $T python t.py", "cannot tell which program timeout runs"),
    ("nohup", "nohup would run the first override as its program"),
    ("sudo -u bob", "sudo would run the first override as its program"),
    ("/BIN/BASH -c", "is bash"),
    ("ksh93 -c", "is ksh"),
    ("bash-static -c", "is bash"),
    ("=bash -c", "is bash"),
    ("~ -c", "not a literal word"),
    ("a$(echo)b -c", "not a literal word"),
    ("`echo sh` -c", "not a literal word"),
    ("sh", "is sh"),
    ("bash -x run.sh", "is bash"),
    ("busybox sh -c", "is busybox"),
    ("make train", "is make"),
    ("gdb --args python t.py", "is gdb"),
    ("conda run -n env python t.py", "is conda"),
    ("torchrun --no-python sh -c", "--no-python"),
    ("deepspeed --hostfile hosts t.py", "several nodes"),
    ("x; (sh) -c", "follows '\\)'"),
    ("repeat 3 eval", "keyword 'repeat'"),  # zsh
    ("if [[ x ]] eval", r"keyword '\[\['"),  # zsh's short if
    ("a[0]=1 python t.py", "array element"),
    ("alias python=eval; python", "it runs alias"),
    ("getopts ab opt; python t.py", "positional parameters"),
    ('python t.py "$@"', "positional parameters"),
    ("python t.py ${1:-x}", "positional parameters"),
    ("python t.py $argv", "positional parameters"),  # zsh
]


def old_argv(shell: Sequence[str], command: str, overrides: Mapping[str, Any]) -> list[str]:
    """The argv the old check let through: the command as the script, the overrides as $@."""
    words = [render_override(k, v) for k, v in overrides.items()]
    return [*shell, command + ' "$@"', os.path.basename(shell[0]), *words]


@pytest.mark.parametrize(("shell", "command", "overrides", "reason"), RUNNABLE_EXPLOITS)
def test_programs_that_reparse_their_arguments_ran_them_and_are_refused(
    shell: list[str], command: str, overrides: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    for needed in (shell[0], "/bin/dash" if "dash" in command or "d?sh" in command else "/"):
        if not os.path.exists(needed):
            pytest.skip("needs " + needed)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    subprocess.run(
        old_argv(shell, command, overrides),
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (tmp_path / "M").exists()  # the exploit: an override ran as code
    with pytest.raises(PayloadError, match=reason) as refused:
        build_argv(shell, command, overrides)
    assert str(refused.value).startswith("overrides cannot be added to the recorded command: ")
    assert str(refused.value).endswith("; rerun without overrides to run it exactly as recorded")
    assert build_argv(shell, command, {}) == ((*shell, command), command)


@pytest.mark.parametrize(
    "name",
    [
        *("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish", "csh", "tcsh"),
        *("eval", "let", "source", ".", "trap", "ssh", "su", "watch", "xargs", "parallel"),
        *("script", "expect", "declare", "typeset", "local", "export", "readonly", "read"),
    ],
)
@pytest.mark.parametrize("form", ["{}", "/usr/local/bin/{}", "nohup {}", "sudo -u bob env A=1 {}"])
def test_reparsers_are_refused_under_any_path_or_wrapper(name: str, form: str) -> None:
    with pytest.raises(PayloadError, match=f"is {re.escape(name)}, which can run"):
        build_argv(SH, "cd /x && " + form.format(name) + " -c y", {"a": 1})


# -- the hostile cases --------------------------------------------------------------


def test_old_quoting_was_exploitable_and_is_now_refused(tmp_path: Path) -> None:
    command = PRINT_ARGS + ' --msg it"s'
    overrides = {"x": '$(touch M)"\\'}
    old_line = " ".join(
        [command, *(shlex.quote(w) for w in map(bytes.decode, rendered(overrides)))]
    )
    subprocess.run([*SH, old_line], cwd=tmp_path, capture_output=True, check=False)
    assert (tmp_path / "M").exists()  # the bug: the override value ran as code
    (tmp_path / "M").unlink()

    with pytest.raises(PayloadError, match='unterminated " quote'):
        build_argv(SH, command, overrides)
    with pytest.raises(PayloadError, match="unterminated"):
        build_argv(SH, 'python t.py --msg it"s', overrides)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ('python t.py --msg it"s', 'unterminated " quote'),
        ("python t.py --msg 'it", "unterminated ' quote"),
        ("python t.py $(date", r"unterminated \$\(...\)"),
        ("python t.py ${HOME", r"unterminated \$\{...\}"),
        ("python t.py `date", "unterminated `...`"),
        ("python t.py #", "# comment"),
        ("python t.py # comment", "# comment"),
        ("python t.py;#", "# comment"),
        ("python t.py \\", "backslash"),
        ("python t.py;", "ends with ';'"),
        ("python t.py ;", "ends with ';'"),
        ("cd /x &&", "ends with '&&'"),
        ("false ||", "ends with '||'"),
        ("python t.py |", "ends with '|'"),
        ("python t.py &", "ends with '&'"),
        ("python t.py >", "ends with '>'"),
        ("python t.py >>", "ends with '>>'"),
        ("python t.py 2>", "ends with '>'"),
        ("python t.py 2>&", "ends with '>&'"),
        ("python t.py <", "ends with '<'"),
        ("(", "ends with '\\('"),
        ("(cd /x && python t.py)", "ends with '\\)'"),
        ("cat <<EOF", "here-document"),
        ("cat <<-EOF", "here-document"),
        ("cat <<<word", "here-document"),
        ("echo $(cat <<EOF) x", "here-document"),
        ("for i in 1; do echo $i; done", "keyword 'done'"),
        ("if true; then python t.py; fi", "keyword 'fi'"),
        ("case a in a) python t.py;; esac", "keyword 'esac'"),
        ("{ python t.py; }", "keyword '}'"),
        ("while true; do", "keyword 'do'"),
        ("for i in", "keyword 'in'"),
        ("{ python t.py; } > log", "runs no program"),
        ("cd /x && A=1", "runs no program"),
        ("A=1 2>/dev/null", "runs no program"),
        ("python t.py &>log", "runs no program"),  # dash: `python t.py &` then `>log "$@"`
        ("python t.py\npython u.py", "several lines"),
        ("python t.py\n", "several lines"),
        ("python t.py \\\n --lr 1", "several lines"),
        ("eval python t.py", "eval"),
        ("command eval python t.py", "eval"),
        *READ_ONLY_EXPLOITS,
        ("python t.py $'it\\'s'", r"\$'...'"),
        ("python t.py \"${x:-'a'}\"", r"double-quoted \$\{...\}"),
        ("python t.py $(case a in a) echo;; esac)", "case statement"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_refused_commands_say_why(command: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match=reason) as refused:
        build_argv(SH, command, {"x": '$(touch M)"\\'})
    message = str(refused.value)
    assert message.startswith("overrides cannot be added to the recorded command: ")
    assert message.endswith("rerun without overrides to run it exactly as recorded")
    with pytest.raises(PayloadError):
        check_appendable(command)
    # Without overrides nothing is appended, so nothing is refused.
    assert build_argv(SH, command, {}) == ((*SH, command), command)


# -- ordinary commands pass, and the overrides arrive last ----------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "python train.py --lr 0.1 model=resnet",
        "torchrun --nproc 8 t.py",
        "cd /x && python t.py",
        "A=1 python t.py \"a b\" 'c'",
        "python -c 'print(1)'",
        "python t.py > out.txt",
        "python t.py 2>&1",
        "python t.py x#y",
        'python t.py "done"',
        "python t.py $(date +%s) `hostname` ${HOME:-/} \"$(echo ')')\"",
        "echo $(( (1 + 2) * 3 )) x",
        "env CUDA_VISIBLE_DEVICES=0 python t.py",
        # Programs behind wrappers, and launchers that are not shells.
        "python train.py --lr 0.1",
        "torchrun --nproc_per_node 8 train.py",
        "/opt/conda/bin/python t.py",
        "CUDA_VISIBLE_DEVICES=0 nohup python t.py",
        "accelerate launch t.py",
        "deepspeed t.py",
        "deepspeed --num_gpus 4 --include localhost:0,1 t.py --eval",
        "srun python t.py",
        "srun -N 2 --ntasks-per-node=8 -l python t.py",
        "srun --some-new-option python t.py eval",
        "timeout 3600 python t.py",
        "timeout -s KILL 10 python3.11 t.py",
        "env A=1 python t.py",
        "env -i PATH=/bin -- python t.py",
        "mpirun -np 4 -x NCCL_DEBUG=INFO --mca btl tcp python t.py",
        "sudo -u bob -E python t.py",
        "nice -n 10 python t.py",
        "nice -10 python t.py",
        "stdbuf -oL python t.py",
        "taskset -c 0-3 python t.py",
        "numactl --cpunodebind 0 --membind 0 python t.py",
        "runuser -u bob -- python t.py",
        "chroot /srv python t.py",
        "uv run --with torch python t.py",
        "command python t.py",
        "exec python t.py",
        "time -p python t.py",
        "! python t.py",
        "set -e; source venv/bin/activate && python t.py",
        "~/venv/bin/python t.py",
        "bash run.sh --lr 1",
        "nohup sh ./scripts/train.sh",
        "printf '%s\\n'",
        "for a in 1 2; do echo $a; done; python t.py",
        'eval "$(conda shell.bash hook)" && conda activate x && python t.py',
        "[ -f x ] && python t.py a[1]",
    ],
)
def test_ordinary_commands_are_appendable(command: str) -> None:
    check_appendable(command)
    argv, display = build_argv(SH, command, {"lr": 0.5, "name": "a b"})
    assert argv == (*SH, command + ' "$@"', "sh", "lr=0.5", "name=a b")
    assert display == command + " lr=0.5 'name=a b'"


@pytest.mark.parametrize(
    ("command", "before"),
    [
        (PRINT_ARGS + " --lr 0.1 model=resnet", [b"--lr", b"0.1", b"model=resnet"]),
        ("cd / && " + PRINT_ARGS + " t.py", [b"t.py"]),
        ("A=1 " + PRINT_ARGS + " \"a b\" 'c'", [b"a b", b"c"]),
        ("true; false || " + PRINT_ARGS + " x 2>/dev/null", [b"x"]),
        ("echo ignored | " + PRINT_ARGS + " `echo y` $(echo ')')", [b"y", b")"]),
        (
            shlex.quote(sys.executable)
            + " -c 'import sys; sys.stdout.write(\"\".join(a + chr(0) for a in sys.argv[1:]))'"
            + ' --msg "it\'s"',
            [b"--msg", b"it's"],
        ),
    ],
)
def test_ordinary_commands_get_the_overrides_last(
    command: str, before: list[bytes], tmp_path: Path
) -> None:
    overrides = {"model": "resnet", "opt.lr": 0.1, "+extra": None, "flag": False, "v": HOSTILE[0]}
    argv, _ = build_argv(SH, command, overrides)
    assert run(argv, tmp_path) == before + rendered(overrides)
    assert list(tmp_path.iterdir()) == []


# -- the shell ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shell",
    [
        ["/usr/bin/fish", "-c"],
        ["/usr/bin/python3", "-c"],
        ["/usr/bin/env", "bash", "-c"],
        ["/bin/sh"],
        ["/bin/sh", "-c", "-e"],
        ["/bin/sh", "-c", "echo", "-c"],
        ["pwsh", "-Command"],
    ],
)
def test_overrides_need_a_posix_shell(shell: list[str]) -> None:
    with pytest.raises(PayloadError, match=r"overrides need a POSIX shell in jobs\.shell"):
        build_argv(shell, "python t.py", {"a": 1})
    assert build_argv(shell, "python t.py", {}) == ((*shell, "python t.py"), "python t.py")


def test_shell_options_before_dash_c_are_kept_and_dollar0_is_the_basename() -> None:
    argv, display = build_argv(["/usr/bin/bash", "-l", "-c"], "python t.py", {"a": True})
    assert argv == ("/usr/bin/bash", "-l", "-c", 'python t.py "$@"', "bash", "a=true")
    assert display == "python t.py a=true"


def test_render_override_is_hydra_style() -> None:
    assert render_override("a", True) == "a=true"
    assert render_override("a", False) == "a=false"
    assert render_override("a", None) == "a=null"
    assert render_override("a", 3) == "a=3"
    assert render_override("a", 0.5) == "a=0.5"
    assert render_override("a.b", "x y") == "a.b=x y"


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.one_of(st.sampled_from(list(" \t\n'\"\\$`(){}#;&|<>=ab0")), st.characters()),
        max_size=40,
    )
)
def test_scanner_never_crashes(command: str) -> None:
    with contextlib.suppress(PayloadError):
        check_appendable(command)
