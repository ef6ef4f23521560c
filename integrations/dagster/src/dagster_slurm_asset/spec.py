"""A typed builder for the parts of a `SlurmAsset` spec a Dagster asset chooses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


@dataclass
class SlurmResources:
    """Overrides of the cluster's queue defaults (`spec.resources`), in Slurm's own forms:
    ``time_limit="02:00:00"``, ``mem="32G"``."""

    partition: str | None = None
    qos: str | None = None
    account: str | None = None
    reservation: str | None = None
    time_limit: str | None = None
    nodes: int | None = None
    ntasks: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    mem_per_cpu: str | None = None
    gpus_per_node: int | None = None
    constraint: str | None = None
    extra_sbatch_args: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if v is not None and v != []:
                out[_camel(k)] = v
        return out


@dataclass
class SlurmJob:
    """What to run and where: becomes the `spec` of a `SlurmAsset`.

    Exactly one payload: ``script`` (a file on the Dagster side, sent in the spec, so it works
    in both modes without a shared file system), ``inline`` (a script's text), ``command``
    (argv run on the cluster) or ``remote_path`` (a script already on the cluster).
    """

    script: str | os.PathLike[str] | None = None
    inline: str | None = None
    command: list[str] | None = None
    remote_path: str | None = None
    args: list[str] = field(default_factory=list)
    #: Interpreter for a script (argv). Default: ``python3`` for ``*.py``, else ``bash``.
    interpreter: list[str] | None = None
    #: Name of the `SlurmCluster`; default: the client's.
    cluster: str | None = None
    resources: SlurmResources | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: An environment already on the cluster (a venv or an unpacked pixi/uv environment).
    pre_deployed_env_path: str | None = None
    #: Resubmissions after infrastructure failures (NODE_FAIL, PREEMPTED, lost transport).
    retry_limit: int | None = None
    #: Keep the run directory on the cluster whatever the outcome.
    debug: bool = False
    #: How the payload starts (the manifest's ``launcher``), e.g. ``{"type": "ray"}`` or
    #: ``{"type": "spark", "spark": {"executorMemory": "2G"}}``; default: directly.
    launcher: dict[str, Any] | None = None

    def to_spec(self) -> dict[str, Any]:
        given = [x is not None for x in (self.script, self.inline, self.command, self.remote_path)]
        if sum(given) != 1:
            raise ValueError("SlurmJob: give exactly one of script, inline, command, remote_path")
        payload: dict[str, Any] = {}
        interpreter = self.interpreter
        if self.script is not None:
            path = Path(self.script)
            payload["inline"] = path.read_text()
            if interpreter is None:
                interpreter = ["python3"] if path.suffix == ".py" else ["bash"]
        elif self.inline is not None:
            payload["inline"] = self.inline
        elif self.command is not None:
            payload["command"] = list(self.command)
        else:
            payload["remotePath"] = self.remote_path
        if interpreter is not None and "command" not in payload:
            payload["interpreter"] = list(interpreter)
        if self.args:
            payload["args"] = list(self.args)
        spec: dict[str, Any] = {"payload": payload}
        if self.cluster:
            spec["clusterRef"] = self.cluster
        if self.resources is not None:
            spec["resources"] = self.resources.to_dict()
        if self.env:
            spec["env"] = [{"name": k, "value": v} for k, v in self.env.items()]
        if self.pre_deployed_env_path:
            spec["environment"] = {"preDeployedEnvPath": self.pre_deployed_env_path}
        if self.retry_limit is not None:
            spec["retry"] = {"limit": self.retry_limit}
        if self.debug:
            spec["debug"] = True
        if self.launcher is not None:
            spec["launcher"] = dict(self.launcher)
        return spec
