"""Reading a `SlurmAsset`'s status: the facts Dagster shows as metadata."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import MetadataValue

TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})


def metrics_pending(status: Mapping[str, Any]) -> bool:
    """The job ended while accounting was down: the operator fills the metrics in later."""
    return any(
        c.get("type") == "MetricsAvailable"
        and c.get("status") == "False"
        and c.get("reason") == "Awaiting"
        for c in status.get("conditions") or []
    )


def run_identity(obj: Mapping[str, Any]) -> str:
    """One run of one object: ``<uid>.<run>`` (a valid Dagster tag value)."""
    uid = (obj.get("metadata") or {}).get("uid", "")
    return f"{uid}.{(obj.get('status') or {}).get('run', 0)}"


_METRICS = {
    "elapsedSeconds": ("slurm/elapsed_seconds", float),
    "cpuEfficiency": ("slurm/cpu_efficiency", float),
    "memoryEfficiency": ("slurm/memory_efficiency", float),
    "totalCpuSeconds": ("slurm/total_cpu_seconds", float),
    "maxRssBytes": ("slurm/max_rss_bytes", int),
    "allocCpus": ("slurm/alloc_cpus", int),
    "allocNodes": ("slurm/alloc_nodes", int),
    "nodeHours": ("slurm/node_hours", float),
    "cpuHours": ("slurm/cpu_hours", float),
    "gpuHours": ("slurm/gpu_hours", float),
}


def slurm_metadata(
    obj: Mapping[str, Any], namespace: str | None = None
) -> dict[str, MetadataValue]:
    """Job ID, state, exit code, nodes, efficiency figures and run directory as metadata."""
    meta = obj.get("metadata") or {}
    s = obj.get("status") or {}
    out: dict[str, MetadataValue] = {
        "slurm/object": MetadataValue.text(
            f"{meta.get('namespace') or namespace or 'default'}/{meta.get('name', '')}"
        ),
        "slurm/phase": MetadataValue.text(str(s.get("phase", ""))),
    }
    text_fields = {
        "jobId": "slurm/job_id",
        "slurmState": "slurm/state",
        "reason": "slurm/reason",
        "remoteRunDir": "slurm/run_dir",
        "startTime": "slurm/start_time",
        "endTime": "slurm/end_time",
    }
    for k, name in text_fields.items():
        if s.get(k) is not None:
            out[name] = MetadataValue.text(str(s[k]))
    if s.get("exitCode") is not None:
        out["slurm/exit_code"] = MetadataValue.int(int(s["exitCode"]))
    if s.get("attempts") is not None:
        out["slurm/attempts"] = MetadataValue.int(int(s["attempts"]))
    if s.get("nodes"):
        out["slurm/nodes"] = MetadataValue.text(",".join(map(str, s["nodes"])))
    for k, v in (s.get("metrics") or {}).items():
        if k in _METRICS and v is not None:
            name, kind = _METRICS[k]
            out[name] = (
                MetadataValue.float(float(v)) if kind is float else MetadataValue.int(int(v))
            )
    return out


def summary_of_failure(obj: Mapping[str, Any]) -> str:
    """One line: which object, which phase, why, the exit code and the operator's message."""
    meta = obj.get("metadata") or {}
    s = obj.get("status") or {}
    parts = [f"SlurmAsset {meta.get('name', '?')} {s.get('phase', '?')}"]
    if s.get("reason"):
        parts.append(f"reason {s['reason']}")
    if s.get("exitCode") is not None:
        parts.append(f"exit code {s['exitCode']}")
    if s.get("jobId"):
        parts.append(f"job {s['jobId']}")
    text = ", ".join(parts)
    if s.get("message"):
        text += f": {s['message']}"
    stderr = ((s.get("logTail") or {}).get("stderr") or "").strip()
    if stderr:
        last = stderr.splitlines()[-5:]
        text += "\nstderr (last lines):\n" + "\n".join(last)
    return text
