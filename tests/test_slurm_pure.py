"""The Slurm launcher's parts that need no cluster: resources recovered from a recorded
environment (hypothesis: whatever the recording holds, what reaches sbatch is a known option
with a plain value, or the rerun is refused), the parsers of Slurm's output, the batch script
(run by a real sh), reading the job's files without trusting them (symlinks, FIFOs, files
of other users), and the config keys."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from argus_agent.config import load_settings
from argus_agent.errors import ConfigError, PayloadError
from argus_agent.jobs import slurm_files
from argus_agent.jobs.slurm_cli import (
    parse_duration,
    parse_exit_code,
    parse_sacct,
    parse_scontrol,
    parse_size,
    parse_squeue,
    parse_sstat,
)
from argus_agent.jobs.slurm_resources import (
    OPTIONS,
    SlurmResources,
    from_env,
    is_slurm_variable,
    sbatch_options,
)

#: Every variable from_env reads.
VARIABLES = [
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_NPROCS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_MEM_PER_NODE",
    "SLURM_MEM_PER_CPU",
    "SLURM_MEM_PER_GPU",
    "SLURM_GPUS",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_ACCOUNT",
    "SLURM_JOB_QOS",
    "SLURM_JOB_NODELIST",
    "SLURMD_NODENAME",
    "SLURM_JOB_NAME",
    "SLURM_JOB_START_TIME",
    "SLURM_JOB_END_TIME",
    "SBATCH_TIMELIMIT",
]
#: What a rendered option's value may be: no whitespace, no control character, no quote,
#: nothing a shell or sbatch's own parser would split (the job name may hold spaces).
PLAIN = re.compile(r"^[A-Za-z0-9_.:,\[\]+@=/-]+$")
NAMES = set(OPTIONS.values())


def test_a_recorded_allocation_comes_back_as_sbatch_options() -> None:
    env = {
        "SLURM_JOB_PARTITION": "gpu",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURM_MEM_PER_CPU": "4000",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_JOB_ACCOUNT": "ml-team",
        "SLURM_JOB_QOS": "normal",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_START_TIME": "1700000000",
        "SLURM_JOB_END_TIME": "1700086400",  # a one-day limit (Slurm >= 23.02)
        "SLURM_JOB_NAME": "train resnet",
        "SLURM_JOB_ID": "4711",  # not a resource
    }
    options = sbatch_options(from_env(env))
    assert options == [
        "--partition=gpu",
        "--nodes=2",
        "--ntasks=8",
        "--ntasks-per-node=4",
        "--cpus-per-task=6",
        "--mem-per-cpu=4000M",
        "--gpus-per-node=a100:4",
        "--time=1440",
        "--account=ml-team",
        "--qos=normal",
        "--job-name=train resnet",
    ]
    pinned = sbatch_options(from_env(env), pin_node=True)
    assert "--nodelist=gpu[01-02]" in pinned


def test_defaults_where_the_recording_has_none_and_pinning_to_the_batchs_host() -> None:
    options = sbatch_options(
        from_env({"SLURM_GPUS_ON_NODE": "2"}),
        default_partition="batch",
        default_time_limit="4:00:00",
        pin_node=True,
        host="node7",
    )
    assert options == ["--partition=batch", "--gres=gpu:2", "--time=4:00:00", "--nodelist=node7"]
    assert sbatch_options(from_env({})) == []
    # sbatch takes one memory option: Slurm sets one, the per-node one wins if both appear.
    both = from_env({"SLURM_MEM_PER_NODE": "100", "SLURM_MEM_PER_CPU": "50"})
    assert sbatch_options(both) == ["--mem=100M"]
    assert from_env({"SBATCH_TIMELIMIT": "2-00:00:00"}).time_limit == "2-00:00:00"
    assert from_env({"SLURM_JOB_PARTITION": "(null)"}).partition is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SLURM_JOB_PARTITION", "x --uid=0"),
        ("SLURM_JOB_PARTITION", "gpu\n#SBATCH --uid=0"),
        ("SLURM_JOB_PARTITION", "--uid=0"),
        ("SLURM_CPUS_PER_TASK", "0"),
        ("SLURM_CPUS_PER_TASK", "4;id"),
        ("SLURM_MEM_PER_NODE", "1G"),
        ("SLURM_GPUS_PER_NODE", "a100:4 --gid=0"),
        ("SLURM_JOB_NODELIST", "$(id)"),
        ("SLURM_JOB_ACCOUNT", "a b"),
        ("SBATCH_TIMELIMIT", "10 --uid=0"),
        ("SLURM_JOB_END_TIME", "soon"),
    ],
)
def test_values_slurm_never_writes_are_refused_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(PayloadError, match=variable):
        from_env({variable: value})


def test_a_job_name_that_does_not_fit_is_dropped_not_refused() -> None:
    assert from_env({"SLURM_JOB_NAME": "x\n#SBATCH --uid=0"}).job_name is None


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(VARIABLES),
        st.one_of(
            st.text(max_size=40),
            st.from_regex(r"[0-9]{1,4}", fullmatch=True),
            st.from_regex(r"[a-z0-9:,\[\]-]{1,20}", fullmatch=True),
        ),
    ),
    st.booleans(),
)
def test_whatever_is_recorded_only_known_options_with_plain_values_reach_sbatch(
    env: dict[str, str], pin: bool
) -> None:
    try:
        options = sbatch_options(from_env(env), pin_node=pin, host="node1")
    except PayloadError as exc:
        assert any(v in str(exc) for v in VARIABLES)
        return
    seen = set()
    for option in options:
        name, _, value = option.partition("=")
        assert name in NAMES and name not in seen
        seen.add(name)
        if name == "--job-name":
            assert not any(ord(c) < 32 for c in value) and not value.startswith("-")
        else:
            assert PLAIN.match(value), option
    assert "--uid" not in seen and "--gid" not in seen


@given(
    st.builds(
        SlurmResources,
        partition=st.none() | st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True),
        nodes=st.none() | st.integers(1, 64).map(str),
        ntasks=st.none() | st.integers(1, 512).map(str),
        cpus_per_task=st.none() | st.integers(1, 128).map(str),
        mem_per_node_mb=st.none() | st.integers(1, 10**6).map(str),
        gpus_per_node=st.none() | st.integers(1, 8).map(str),
    )
)
def test_what_slurm_records_for_an_allocation_gives_that_allocation_back(
    resources: SlurmResources,
) -> None:
    # The variables sbatch sets in the job for these requests.
    recorded = {
        "SLURM_JOB_PARTITION": resources.partition,
        "SLURM_JOB_NUM_NODES": resources.nodes,
        "SLURM_NTASKS": resources.ntasks,
        "SLURM_CPUS_PER_TASK": resources.cpus_per_task,
        "SLURM_MEM_PER_NODE": resources.mem_per_node_mb,
        "SLURM_GPUS_PER_NODE": resources.gpus_per_node,
    }
    env = {k: v for k, v in recorded.items() if v is not None}
    assert from_env(env) == resources


def test_which_recorded_variables_are_slurms() -> None:
    for name in ("SLURM_JOB_ID", "SLURMD_NODENAME", "SBATCH_PARTITION", "CUDA_VISIBLE_DEVICES"):
        assert is_slurm_variable(name)
    for name in ("PATH", "HOME", "MY_SLURM_THING", "CUDA_HOME"):
        assert not is_slurm_variable(name)


# -- parsers ---------------------------------------------------------------------------------


def test_parsers_read_what_slurm_prints() -> None:
    rows = parse_squeue(
        "12|RUNNING|debug|vm|None\n13|PENDING|gpu||ReqNodeNotAvail, UnavailableNodes:vm\n"
        "14_3|RUNNING|debug|vm|None\nnonsense\n"
    )
    assert set(rows) == {12, 13}
    assert rows[13].reason == "ReqNodeNotAvail, UnavailableNodes:vm" and rows[13].nodes == ""
    info = parse_scontrol(
        "JobId=12 JobName=a b JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0"
    )
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0")
    assert parse_sacct("12|CANCELLED by 0|0:15\n", 12) == ("CANCELLED", "0:15")
    assert parse_sacct("13|COMPLETED|0:0\n", 12) is None
    assert parse_exit_code("0:125") == (0, 125)
    assert parse_exit_code(None) == (None, None)
    assert parse_duration("1-02:03:04") == 93784
    assert parse_duration("01:02.500") == 62.5
    assert parse_size("58492K") == 58492 * 1024 and parse_size("1.5G") == int(1.5 * (1 << 30))
    usage = parse_sstat(
        "12.batch|1|cpu=00:00:03,energy=0,mem=58492K,pages=3|58492K\n"
        "12.0|2|cpu=00:01:00,mem=1M|700K\n13.extern|1|cpu=00:00:00,mem=0|0\n"
    )
    assert usage[12].cpu_s == 63 and usage[12].mem_bytes == 58492 * 1024 + (1 << 20)
    assert usage[12].max_rss_bytes == 58492 * 1024 and usage[12].tasks == 3


# -- the batch script and the job's files ------------------------------------------------------


def test_the_batch_script_runs_the_argv_verbatim_and_records_the_exit_status(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out dir's"
    out.mkdir()
    argv = ["/bin/sh", "-c", 'printf "%s|" "$@"; exit 4', "sh", "a b", "$(id)", "it's\nthere"]
    script = slurm_files.batch_script(argv, str(out), "rerun-1")
    done = subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True)
    assert done.returncode == 4
    assert done.stdout == "a b|$(id)|it's\nthere|"
    assert slurm_files.read_exit_code(str(out), os.getuid()) == 4


def test_the_job_s_files_are_read_only_when_they_are_regular_files_of_the_job_s_user(
    tmp_path: Path,
) -> None:
    """A job (its user controls its output directory) must not make a root agent read a
    file for it: a symlink, a FIFO, or a file another user owns is refused, never read."""
    mirror = str(tmp_path / "mirror.log")
    source = tmp_path / "output.log"
    source.write_text("one\ntwo\n")
    uid = os.getuid()
    assert slurm_files.copy_output(str(source), mirror, uid, 1 << 20).copied == 8
    source.write_text("one\ntwo\nthree\n")
    assert slurm_files.copy_output(str(source), mirror, uid, 1 << 20).copied == 6
    assert Path(mirror).read_text() == "one\ntwo\nthree\n"
    # A symlink to a secret, a FIFO (would block the agent), a file of another user.
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")
    link = tmp_path / "link.log"
    link.symlink_to(secret)
    got = slurm_files.copy_output(str(link), str(tmp_path / "m2"), uid, 1 << 20)
    assert got.copied == 0 and got.unreadable
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    got = slurm_files.copy_output(str(fifo), str(tmp_path / "m3"), uid, 1 << 20)
    assert got.copied == 0 and "not a regular file" in (got.unreadable or "")
    got = slurm_files.copy_output(str(source), str(tmp_path / "m4"), uid + 1, 1 << 20)
    assert got.copied == 0 and "not owned by the job's user" in (got.unreadable or "")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m4").exists()
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "exit_code").symlink_to(secret)
    assert slurm_files.read_exit_code(str(tmp_path / "ex"), uid) is None
    # The cap: copying stops there, with a marker line.
    big = tmp_path / "big.log"
    big.write_text("x" * 5000 + "\n")
    got = slurm_files.copy_output(str(big), str(tmp_path / "m5"), uid, 4096)
    assert got.capped and "jobs.log_max_bytes" in (tmp_path / "m5").read_text()
    assert slurm_files.copy_output(str(big), str(tmp_path / "m5"), uid, 4096).copied == 0


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ARGUS_AGENT_JOBS_SLURM_HOSTS", '["n1", "N1"]', "'N1' is listed twice"),
        ("ARGUS_AGENT_JOBS_SLURM_HOSTS", '["*", "n1"]', '"*" (every node sinfo reports) stands'),
        ("ARGUS_AGENT_JOBS_SLURM_HOSTS", '["n1 --uid=0"]', "'n1 --uid=0' is not a host name"),
        ("ARGUS_AGENT_JOBS_SLURM_HOSTS", '["-n1"]', "'-n1' is not a host name"),
        ("ARGUS_AGENT_JOBS_SLURM_HOSTS", '["n1"]', 'only with launcher = "slurm"'),
        ("ARGUS_AGENT_JOBS_SLURM_PARTITIONS", '["gpu"]', 'only with slurm_hosts = ["*"]'),
        ("ARGUS_AGENT_JOBS_SLURM_PARTITIONS", '["g,pu"]', "'g,pu' is not a Slurm partition"),
        ("ARGUS_AGENT_JOBS_SLURM_EXTRA_ARGS", '["--uid=0"]', "--uid is set by the agent"),
        ("ARGUS_AGENT_JOBS_SLURM_EXTRA_ARGS", '["-o/tmp/x"]', "-o is set by the agent"),
        ("ARGUS_AGENT_JOBS_SLURM_PARTITION", "a b", "expected a Slurm partition name"),
        ("ARGUS_AGENT_JOBS_SLURM_TIME_LIMIT", "soon", "expected a Slurm time"),
        ("ARGUS_AGENT_JOBS_LAUNCHER", "kubernetes", "jobs.launcher"),
    ],
)
def test_slurm_config_mistakes_are_one_line_naming_the_key(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    empty = tmp_path / "config.toml"
    empty.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_settings(empty, environ={name: value})
    text = str(caught.value)
    assert message in text and "\n" not in text


async def test_the_slurm_launcher_refuses_to_start_without_slurms_commands(tmp_path: Path) -> None:
    from argus_agent.config import JobSettings
    from argus_agent.jobs.slurm import SlurmJobs
    from argus_agent.jobs.slurm_cli import SlurmCommands
    from argus_agent.jobs.slurm_store import SlurmStore

    settings = JobSettings(launcher="slurm")
    commands = SlurmCommands(10.0, environ={"PATH": str(tmp_path)})
    jobs = SlurmJobs(SlurmStore(tmp_path / "slurm"), settings, commands=commands)
    with pytest.raises(ConfigError, match="PATH lacks sbatch, squeue, scontrol, scancel"):
        jobs.adopt_existing()


async def test_a_failing_sacct_is_asked_again_and_only_a_definite_answer_is_kept(
    tmp_path: Path,
) -> None:
    """slurmdbd down for a while must not make the agent believe, for the rest of its life,
    that the cluster has no accounting: only an answer, or "accounting storage is disabled",
    is remembered. (A stand-in sacct: the failure it plays cannot be ordered from a real
    slurmdbd on demand.)"""
    from argus_agent.jobs.slurm_cli import SlurmCommands

    calls = tmp_path / "calls"
    sacct = tmp_path / "sacct"
    sacct.write_text(
        "#!/bin/sh\n"
        f"echo x >> {calls}\n"
        f'if [ "$(wc -l < {calls})" -eq 1 ]; then\n'
        '  echo "sacct: error: slurmdbd: Connection refused" >&2; exit 1\n'
        "fi\n"
        "exit 0\n"
    )
    sacct.chmod(0o755)
    commands = SlurmCommands(10.0, environ={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert await commands.accounting() is False  # slurmdbd down: not known yet
    assert commands.accounting_known is None
    assert await commands.accounting() is True  # asked again, and it answers
    assert await commands.accounting() is True  # now remembered: no third call
    assert calls.read_text().count("x") == 2
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "sacct").write_text(
        '#!/bin/sh\necho "sacct: error: Slurm accounting storage is disabled" >&2\nexit 1\n'
    )
    (tmp_path / "off" / "sacct").chmod(0o755)
    off = SlurmCommands(10.0, environ={"PATH": f"{tmp_path / 'off'}:/usr/bin:/bin"})
    assert await off.accounting() is False
    assert off.accounting_known is False


@pytest.mark.parametrize(
    "name",
    [
        "SLURM_NTASKS",
        "SLURM_JOB_PARTITION",
        "SLURM_CPUS_PER_TASK",
        "SLURM_MEM_PER_NODE",
        "SLURM_JOB_ACCOUNT",
    ],
)
def test_a_recorded_value_with_a_trailing_newline_is_refused(name: str) -> None:
    """Python's ``$`` matches before a final newline: every shape check is a full match."""
    from argus_agent.errors import PayloadError
    from argus_agent.jobs.slurm_resources import from_env

    good = {"SLURM_NTASKS": "4", "SLURM_JOB_PARTITION": "gpu", "SLURM_CPUS_PER_TASK": "2"}
    good |= {"SLURM_MEM_PER_NODE": "200", "SLURM_JOB_ACCOUNT": "ml"}
    from_env({name: good[name]})
    with pytest.raises(PayloadError, match=name):
        from_env({name: good[name] + "\n"})


def test_names_with_a_trailing_newline_are_refused_everywhere_they_are_checked(
    tmp_path: Path,
) -> None:
    from argus_agent.protocol import Command, decode_command

    empty = tmp_path / "config.toml"
    empty.write_text("")
    for name, value in [
        ("ARGUS_AGENT_JOBS_SLURM_PARTITION", "gpu\n"),
        ("ARGUS_AGENT_JOBS_SLURM_TIME_LIMIT", "90\n"),
    ]:
        with pytest.raises(ConfigError):
            load_settings(empty, environ={name: value})
    with pytest.raises(ConfigError, match="is not a host name"):
        load_settings(
            empty,
            environ={
                "ARGUS_AGENT_JOBS_LAUNCHER": "slurm",
                "ARGUS_AGENT_JOBS_SLURM_HOSTS": '["gpu-01\\n", "gpu-01"]',
            },
        )
    item = {"id": "c-1", "kind": "stop", "batch_id": "b-1\n", "payload": {}}
    assert not isinstance(decode_command(item), Command)
