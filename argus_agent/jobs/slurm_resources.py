"""The resources of a Slurm rerun, recovered from the run's recorded environment. Pure.

A job that ran under Slurm carries its allocation in its environment (sbatch's "output
environment variables": ``SLURM_JOB_PARTITION``, ``SLURM_JOB_NUM_NODES``, ``SLURM_NTASKS``,
``SLURM_CPUS_PER_TASK``, ``SLURM_MEM_PER_NODE``, ``SLURM_GPUS_PER_NODE``, …), and the SDK's
env snapshot records it. :func:`from_env` turns those variables back into a
:class:`SlurmResources`; :func:`sbatch_options` renders them (with the config's defaults
where the recording has none, and the original node list when pinning) as ``--name=value``
options for sbatch's argv. What the recording cannot tell (the time limit before Slurm 23.02,
which added ``SLURM_JOB_START_TIME``/``SLURM_JOB_END_TIME``) is left to the config or to
Slurm's defaults.

Every value must look exactly like what Slurm writes there (digits, a partition name, a
node list, ``type:count`` GPUs); anything else is refused with a PayloadError naming the
variable, so a recording cannot smuggle an option (``x --uid=0``), a newline or a shell word
into a submission. The options go to sbatch as separate argv words (never through a shell
or ``#SBATCH`` lines) in any case; the check is the second wall. Only the cosmetic job name
is dropped instead of refused when it does not fit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from argus_agent.errors import PayloadError
from argus_agent.slurmconfig import TIME_RE

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PARTITIONS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64}){0,31}$")
COUNT_RE = re.compile(r"^[1-9][0-9]{0,6}$")
NODES_RE = re.compile(r"^[1-9][0-9]{0,5}(-[1-9][0-9]{0,5})?$")
MEGABYTES_RE = re.compile(r"^[1-9][0-9]{0,9}$")
#: GPU counts as Slurm writes them: ``2``, ``a100:2``, ``a100:1,v100:2``.
GPUS_RE = re.compile(
    r"^([A-Za-z0-9_.-]{1,32}:)?[0-9]{1,4}(,([A-Za-z0-9_.-]{1,32}:)?[0-9]{1,4}){0,7}$"
)
#: A node list: names and Slurm's bracket ranges, ``gpu[01-04,07],login1``.
NODELIST_RE = re.compile(r"^[A-Za-z0-9_.\[\],-]{1,1024}$")
GPU_COUNT_RE = re.compile(r"^[0-9]{1,4}$")
EPOCH_RE = re.compile(r"^[0-9]{9,11}$")
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+@=/][A-Za-z0-9 _.:+@=/,-]{0,127}$")
#: Values Slurm writes for "none".
NULLS = frozenset({"", "(null)", "N/A", "None"})

#: Recorded variables that describe the old allocation (or configure Slurm's own tools) and
#: so never reach a rerun's environment: the new job gets its own from Slurm. The GPU
#: device lists are Slurm's too (the ids of the old node's GPUs).
SLURM_ENV_PREFIXES = ("SLURM_", "SLURMD_", "SBATCH_", "SALLOC_", "SRUN_", "PMI_", "PMIX_")
SLURM_ENV_NAMES = frozenset({"CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES"})


@dataclass(frozen=True)
class SlurmResources:
    """What the original run asked Slurm for (None: not recorded). Memory in megabytes."""

    partition: str | None = None
    nodes: str | None = None
    ntasks: str | None = None
    ntasks_per_node: str | None = None
    cpus_per_task: str | None = None
    mem_per_node_mb: str | None = None
    mem_per_cpu_mb: str | None = None
    mem_per_gpu_mb: str | None = None
    gpus: str | None = None
    gpus_per_node: str | None = None
    gpus_per_task: str | None = None
    #: ``gpu:N`` when only the count of GPUs on the node was recorded.
    gres: str | None = None
    time_limit: str | None = None
    account: str | None = None
    qos: str | None = None
    #: The node(s) it ran on: used only when pinning (``jobs.slurm_pin_node``).
    nodelist: str | None = None
    job_name: str | None = None


#: field → (variables in order of preference, pattern of a valid value).
_SOURCES: dict[str, tuple[tuple[str, ...], re.Pattern[str]]] = {
    "partition": (("SLURM_JOB_PARTITION",), PARTITIONS_RE),
    "nodes": (("SLURM_JOB_NUM_NODES", "SLURM_NNODES"), NODES_RE),
    "ntasks": (("SLURM_NTASKS", "SLURM_NPROCS"), COUNT_RE),
    "ntasks_per_node": (("SLURM_NTASKS_PER_NODE",), COUNT_RE),
    "cpus_per_task": (("SLURM_CPUS_PER_TASK",), COUNT_RE),
    "mem_per_node_mb": (("SLURM_MEM_PER_NODE",), MEGABYTES_RE),
    "mem_per_cpu_mb": (("SLURM_MEM_PER_CPU",), MEGABYTES_RE),
    "mem_per_gpu_mb": (("SLURM_MEM_PER_GPU",), MEGABYTES_RE),
    "gpus": (("SLURM_GPUS",), GPUS_RE),
    "gpus_per_node": (("SLURM_GPUS_PER_NODE",), GPUS_RE),
    "gpus_per_task": (("SLURM_GPUS_PER_TASK",), GPUS_RE),
    "account": (("SLURM_JOB_ACCOUNT",), NAME_RE),
    "qos": (("SLURM_JOB_QOS",), NAME_RE),
    "nodelist": (("SLURM_JOB_NODELIST", "SLURMD_NODENAME"), NODELIST_RE),
}


def is_slurm_variable(name: str) -> bool:
    """Whether a recorded variable belongs to the old allocation (see SLURM_ENV_PREFIXES)."""
    return name.startswith(SLURM_ENV_PREFIXES) or name in SLURM_ENV_NAMES


def _value(env: Mapping[str, str], name: str, pattern: re.Pattern[str]) -> str | None:
    raw = env.get(name)
    if raw is None or raw in NULLS:
        return None
    if not isinstance(raw, str) or not pattern.fullmatch(raw):
        raise PayloadError(
            f"the recorded {name} is {raw[:80]!r}, not a value Slurm writes there; the rerun "
            "is refused rather than submitted with it"
        )
    return raw


def from_env(env: Mapping[str, str]) -> SlurmResources:
    """The resources a run recorded in its environment. Raises PayloadError naming the
    first variable whose value is not what Slurm writes there."""
    found: dict[str, str | None] = {}
    for name, (variables, pattern) in _SOURCES.items():
        found[name] = None
        for variable in variables:
            value = _value(env, variable, pattern)
            if value is not None:
                found[name] = value
                break
    # sbatch takes one memory option only; Slurm sets one of them.
    if found["mem_per_node_mb"]:
        found["mem_per_cpu_mb"] = found["mem_per_gpu_mb"] = None
    elif found["mem_per_cpu_mb"]:
        found["mem_per_gpu_mb"] = None
    if not (found["gpus"] or found["gpus_per_node"] or found["gpus_per_task"]):
        on_node = _value(env, "SLURM_GPUS_ON_NODE", GPU_COUNT_RE)
        if on_node and int(on_node) > 0:
            found["gres"] = f"gpu:{int(on_node)}"
    found["time_limit"] = _time_limit(env)
    name = env.get("SLURM_JOB_NAME")
    found["job_name"] = name if isinstance(name, str) and JOB_NAME_RE.fullmatch(name) else None
    return SlurmResources(**found)


def _time_limit(env: Mapping[str, str]) -> str | None:
    """Minutes from ``SLURM_JOB_END_TIME - SLURM_JOB_START_TIME`` (Slurm ≥ 23.02; the end
    time is the start plus the limit), else an ``SBATCH_TIMELIMIT`` the run was submitted
    with; None when neither is recorded."""
    start = _value(env, "SLURM_JOB_START_TIME", EPOCH_RE)
    end = _value(env, "SLURM_JOB_END_TIME", EPOCH_RE)
    if start and end and int(end) > int(start):
        return str(math.ceil((int(end) - int(start)) / 60))
    return _value(env, "SBATCH_TIMELIMIT", TIME_RE)


#: field → sbatch option, in the order they are rendered.
OPTIONS = {
    "partition": "--partition",
    "nodes": "--nodes",
    "ntasks": "--ntasks",
    "ntasks_per_node": "--ntasks-per-node",
    "cpus_per_task": "--cpus-per-task",
    "mem_per_node_mb": "--mem",
    "mem_per_cpu_mb": "--mem-per-cpu",
    "mem_per_gpu_mb": "--mem-per-gpu",
    "gpus": "--gpus",
    "gpus_per_node": "--gpus-per-node",
    "gpus_per_task": "--gpus-per-task",
    "gres": "--gres",
    "time_limit": "--time",
    "account": "--account",
    "qos": "--qos",
    "nodelist": "--nodelist",
    "job_name": "--job-name",
}
_MEGABYTES = {"mem_per_node_mb", "mem_per_cpu_mb", "mem_per_gpu_mb"}


def sbatch_options(
    resources: SlurmResources,
    *,
    default_partition: str | None = None,
    default_time_limit: str | None = None,
    pin_node: bool = False,
    host: str | None = None,
) -> list[str]:
    """sbatch options (``--name=value`` words) for ``resources``: the config's partition
    and time limit where the recording has none; ``--nodelist`` only with ``pin_node`` (the
    recorded node list, else ``host``, the batch's host)."""
    values = {f.name: getattr(resources, f.name) for f in fields(resources)}
    values["partition"] = values["partition"] or default_partition
    values["time_limit"] = values["time_limit"] or default_time_limit
    if pin_node:
        pinned = values["nodelist"] or host
        values["nodelist"] = pinned if pinned and NODELIST_RE.fullmatch(pinned) else None
    else:
        values["nodelist"] = None
    options = []
    for name, option in OPTIONS.items():
        value = values[name]
        if value is None:
            continue
        options.append(f"{option}={value}M" if name in _MEGABYTES else f"{option}={value}")
    return options
