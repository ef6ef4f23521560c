"""Deterministic object names and Kubernetes-safe label values derived from Dagster facts."""

from __future__ import annotations

import hashlib
import re

_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")
_NOT_NAME = re.compile(r"[^a-z0-9-]+")


def _digest(*parts: str, length: int = 12) -> str:
    h = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return h[:length]


def object_name(asset_key: str, partition_key: str | None, run_id: str) -> str:
    """The `SlurmAsset` name for one Dagster step: the same asset key, partition and run ID
    always give the same name (a retried step finds its object again), different ones never
    collide in practice (a 48-bit hash), and the name stays a valid DNS label (≤ 63)."""
    slug = _NOT_NAME.sub("-", asset_key.lower().replace("/", "-")).strip("-")
    slug = re.sub("-{2,}", "-", slug)[:40].strip("-") or "asset"
    return f"{slug}-{_digest(asset_key, partition_key or '', run_id)}"


def label_value(value: str) -> str:
    """`value` as a valid label value (≤ 63 of ``[A-Za-z0-9_.-]``, alphanumeric at both ends);
    a value that had to change gets a hash suffix so that distinct values stay distinct."""
    clean = _NOT_LABEL.sub(".", value).strip("._-")
    if clean == value and len(value) <= 63:
        return value
    return f"{clean[:50].strip('._-')}.{_digest(value, length=10)}".lstrip(".")


def session_name(run_id: str) -> str:
    """The `SlurmSession` a Dagster run owns (``PipesSlurmAssetClient(run_session=...)``)."""
    return f"dagster-run-{_digest(run_id)}"
