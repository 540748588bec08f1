"""The ``jobs.launcher`` and ``jobs.slurm_*`` keys: their fields and checks.

Kept out of ``config.py`` (which would pass 600 lines) but part of its ``JobSettings``: each
field is declared there as ``name: TYPE = slurmconfig.NAME`` and ``check`` runs as its
model validator, so the keys live in the ``[jobs]`` table, are documented by ``configdoc``
like every other key, and a mistake is one line naming the key. No I/O.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

Launcher = Literal["local", "slurm"]

#: sbatch options the agent sets itself for every submission; config may not replace them
#: (``--uid``/``--gid``: a system agent submits as the batch's owner through runuser, never
#: by asking Slurm to change the user).
AGENT_OWNED_OPTIONS = (
    "--uid",
    "--gid",
    "--export",
    "--export-file",
    "--output",
    "--error",
    "--input",
    "--chdir",
    "-o",
    "-e",
    "-i",
    "-D",
    "--parsable",
    "--wrap",
    "--comment",
    "--open-mode",
)
PARTITION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED.
TIME_RE = re.compile(
    r"^(\d{1,7}(:\d{1,2}){0,2}|\d{1,4}-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$"
)

LAUNCHER = Field(
    default="local",
    description='How reruns are started. "local": on this host, each job under its own '
    'supervisor process. "slurm": submitted with sbatch (this host is a Slurm login node); '
    "Slurm places, limits, accounts and kills them; see docs/slurm.md.",
)
SLURM_PIN_NODE = Field(
    default=False,
    description="Submit a rerun to the node(s) the original run had (its recorded "
    "SLURM_JOB_NODELIST, else the batch's host) instead of any node of its partition.",
)
SLURM_PARTITION = Field(
    default=None,
    examples=["gpu"],
    description="Partition for reruns whose recorded environment names none "
    "(SLURM_JOB_PARTITION). Unset: Slurm's default partition.",
)
SLURM_TIME_LIMIT = Field(
    default=None,
    examples=["1-00:00:00"],
    description="Time limit (sbatch --time) for reruns whose recorded environment does not "
    "tell theirs (Slurm 22.05 records none; 23.02 and later record start and end time). "
    "Unset: the partition's default.",
)
SLURM_EXTRA_ARGS = Field(
    default_factory=list,
    examples=[["--account=ml", "--qos=normal"]],
    description="sbatch options added to every submission after those recovered from the "
    "run, e.g. a site's account. Options the agent sets itself (--uid, --gid, --export, "
    "--output, --chdir, ...) are refused.",
)
SLURM_OUTPUT_DIR = Field(
    default=None,
    examples=["/shared/argus-output"],
    description="Where each rerun's output directory (argus-<batch id>/, with output.log "
    "and the job's exit status) is made, as the job's user: a directory on the cluster's "
    "shared filesystem that job users can write. Unset: the rerun's working directory.",
)
SLURM_POLL_S = Field(
    default=2.0,
    gt=0,
    le=600,
    description="Seconds between two looks at the queue (one squeue call for all of the "
    "agent's jobs), which also copy new output into the log.",
)
SLURM_USAGE_INTERVAL_S = Field(
    default=30.0,
    ge=5,
    le=3600,
    description="Seconds between two resource readings of the running jobs (one sstat call "
    "for all of them), each sent as a resource snapshot per job.",
)
SLURM_COMMAND_TIMEOUT_S = Field(
    default=60.0,
    gt=0,
    le=600,
    description="How long one Slurm command (sbatch, squeue, scancel, ...) may take; a "
    "submission that takes longer is looked for in the queue, then acked failed.",
)
SLURM_HOSTS = Field(
    default_factory=list,
    examples=[["gpu-node-01", "gpu-node-02"], ["*"]],
    description="Compute-node host names this agent serves besides agent.hostname (only with "
    'launcher = "slurm"): each gets a registration of its own with the server, all polled '
    'by this one daemon. ["*"]: every node sinfo reports (in slurm_partitions when set), '
    "looked up again every 10 minutes. Empty: only agent.hostname.",
)
SLURM_PARTITIONS = Field(
    default_factory=list,
    examples=[["gpu", "gpu-long"]],
    description='With slurm_hosts = ["*"]: serve only the nodes of these partitions. '
    "Empty: the nodes of every partition.",
)

#: A host name as Argus records it (socket.gethostname()) and Slurm names nodes.
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
#: More served names than this is a mistake (a node list pasted whole, say).
MAX_HOSTS = 10_000
EVERY_NODE = "*"


def check(values: Any) -> None:
    """Check the Slurm keys of a JobSettings; raises ValueError naming the key."""
    _check_hosts(values.slurm_hosts, values.launcher)
    for name in values.slurm_partitions:
        if not PARTITION_RE.fullmatch(name):
            raise ValueError(f"slurm_partitions: {name[:80]!r} is not a Slurm partition name")
    if values.slurm_partitions and values.slurm_hosts != [EVERY_NODE]:
        raise ValueError('slurm_partitions: only with slurm_hosts = ["*"] (every node of them)')
    if values.slurm_partition is not None and not PARTITION_RE.fullmatch(values.slurm_partition):
        raise ValueError("slurm_partition: expected a Slurm partition name")
    if values.slurm_time_limit is not None and not TIME_RE.fullmatch(values.slurm_time_limit):
        raise ValueError("slurm_time_limit: expected a Slurm time such as 90, 4:00:00 or 1-00:00")
    for arg in values.slurm_extra_args:
        if not arg.startswith("-") or any(ord(c) < 32 for c in arg):
            raise ValueError(f"slurm_extra_args: {arg[:80]!r} is not one sbatch option")
        # --name=value, or a short option with its value glued on (-oFILE)
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        if name in AGENT_OWNED_OPTIONS:
            raise ValueError(f"slurm_extra_args: {name} is set by the agent itself")
    out: Path | None = values.slurm_output_dir
    if out is not None:
        if not out.is_absolute():
            raise ValueError("slurm_output_dir: expected an absolute directory path")
        if "%" in str(out) or "\\" in str(out):
            raise ValueError("slurm_output_dir: Slurm reads % and \\ in output paths as patterns")


def _check_hosts(hosts: list[str], launcher: str) -> None:
    if not hosts:
        return
    if EVERY_NODE in hosts and len(hosts) > 1:
        raise ValueError('slurm_hosts: "*" (every node sinfo reports) stands alone')
    if len(hosts) > MAX_HOSTS:
        raise ValueError(f"slurm_hosts: {len(hosts)} names; at most {MAX_HOSTS}")
    seen: set[str] = set()
    for name in hosts:
        if name != EVERY_NODE and not HOST_RE.fullmatch(name):
            raise ValueError(f"slurm_hosts: {name[:80]!r} is not a host name")
        if name.casefold() in seen:
            raise ValueError(f"slurm_hosts: {name!r} is listed twice")
        seen.add(name.casefold())
    if launcher != "slurm":
        raise ValueError('slurm_hosts: only with launcher = "slurm"')
