"""Reporting `SlurmAsset` runs started outside Dagster (``kubectl apply``, GitOps, a standalone
directory): a sensor that turns every run that ended into asset events, and `AssetSpec`s that
put those assets into the asset graph."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetSpec,
    DagsterEventType,
    DagsterInstance,
    DefaultSensorStatus,
    EventRecordsFilter,
    MetadataValue,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.metadata.external_metadata import metadata_map_from_external

from .client import ANN_PARTITION, LAUNCHED_BY
from .status import TERMINAL, metrics_pending, run_identity, slurm_metadata
from .store import SlurmAssetObject, SlurmAssetStore, asset_key_of

#: Tag on every event the sensor reports: the object's UID and run number. The sensor looks
#: for it in the event log before reporting, so a lost cursor never reports a run twice.
TAG_RUN = "dagster-slurm/run"
#: Annotation (or `spec.pipesContext.partitionKey`) naming the partition an object computes.
ANN_PARTITION_KEY = "dagster-slurm.io/partition-key"

Event = AssetMaterialization | AssetObservation | AssetCheckEvaluation


@dataclass
class TickReport:
    """What one evaluation did (for the sensor's log line and for measuring it)."""

    events: list[Event]
    cursor: str
    objects: int
    candidates: int
    already_reported: int
    seconds: float


def report_ended_runs(
    instance: DagsterInstance,
    store: SlurmAssetStore,
    cursor: str | None,
    *,
    label_selector: str | None = None,
    lookback_seconds: float = 600.0,
    now: float | None = None,
) -> TickReport:
    """The events for every run that ended since `cursor` and is not in the event log yet.

    The cursor holds the time of the previous tick; a run counts as ended when its last
    condition changed (the operator's clock), so runs ending within `lookback_seconds` before
    that tick are looked at again (clock skew, status written late) and filtered out by the
    event-log check. Without a cursor every ended run is looked at once.
    """
    start = time.monotonic()
    tick = now if now is not None else time.time()
    since = _since(cursor)
    selector = ",".join(x for x in (label_selector, f"!{LAUNCHED_BY}") if x)
    objects = store.list(selector)
    candidates = []
    for obj in objects:
        status = obj.get("status") or {}
        if status.get("phase") not in TERMINAL or not status.get("run"):
            continue
        if metrics_pending(status):
            continue  # reported when accounting has answered (its condition changes then)
        if since is not None and _ended_at(status) < since - lookback_seconds:
            continue
        candidates.append(obj)
    events: list[Event] = []
    seen = 0
    after = min((_ended_at(o.get("status") or {}) for o in candidates), default=tick)
    reported = _reported_runs(instance, after - lookback_seconds) if candidates else set()
    for obj in candidates:
        if run_identity(obj) in reported:
            seen += 1
            continue
        evs = events_for_run(store.with_spec(obj), store.namespace)
        events.extend(evs)
    return TickReport(
        events=events,
        cursor=json.dumps({"since": tick}),
        objects=len(objects),
        candidates=len(candidates),
        already_reported=seen,
        seconds=time.monotonic() - start,
    )


def events_for_run(obj: SlurmAssetObject, namespace: str | None = None) -> list[Event]:
    """The asset events of one ended run. The first event is the run's marker: a
    materialization (success) or an observation (failure, cancellation)."""
    status = obj.get("status") or {}
    primary = asset_key_of(obj)
    if not primary:
        return []
    partition = partition_of(obj)
    tags = {TAG_RUN: run_identity(obj)}
    facts = slurm_metadata(obj, namespace)
    pipes = status.get("pipes") or {}
    events: list[Event] = []
    if status.get("phase") == "Succeeded":
        reported = pipes.get("materializations") or [{}]
        for m in reported:
            payload_meta = metadata_map_from_external(m.get("metadata") or {})
            meta = {**payload_meta, **facts}
            if m.get("dataVersion"):
                meta["slurm/data_version"] = MetadataValue.text(m["dataVersion"])
            events.append(
                AssetMaterialization(
                    asset_key=AssetKey.from_escaped_user_string(m.get("assetKey") or primary),
                    partition=partition,
                    metadata=meta,
                    tags=tags,
                )
            )
    else:
        tail = status.get("logTail") or {}
        meta = dict(facts)
        if status.get("message"):
            meta["slurm/message"] = MetadataValue.text(status["message"])
        for stream in ("stdout", "stderr"):
            if tail.get(stream):
                meta[f"slurm/{stream}_tail"] = MetadataValue.md(
                    f"```\n{tail[stream].rstrip()}\n```"
                )
        events.append(
            AssetObservation(
                asset_key=AssetKey.from_escaped_user_string(primary),
                partition=partition,
                description=f"Slurm run {status.get('phase')}: {status.get('reason', '')}",
                metadata=meta,
                tags=tags,
            )
        )
    # The partition goes into the checks' metadata, not their `partition`: Dagster's SQL storage
    # keeps one run-less evaluation per (check, partition), so a second run of the same
    # partition could not be reported.
    check_facts = dict(facts)
    if partition:
        check_facts["slurm/partition"] = MetadataValue.text(partition)
    for c in pipes.get("checkResults") or []:
        severity = c.get("severity") or "ERROR"
        events.append(
            AssetCheckEvaluation(
                asset_key=AssetKey.from_escaped_user_string(c.get("assetKey") or primary),
                check_name=c["checkName"],
                passed=bool(c.get("passed")),
                metadata={**metadata_map_from_external(c.get("metadata") or {}), **check_facts},
                severity=AssetCheckSeverity(severity if severity in ("ERROR", "WARN") else "ERROR"),
            )
        )
    return events


def partition_of(obj: SlurmAssetObject) -> str | None:
    """The partition an object computes: `spec.pipesContext.partitionKey`, else its
    annotation."""
    ctx = (obj.get("spec") or {}).get("pipesContext") or {}
    if isinstance(ctx.get("partitionKey"), str):
        return ctx["partitionKey"]
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    value = ann.get(ANN_PARTITION_KEY) or ann.get(ANN_PARTITION)
    return value if isinstance(value, str) else None


def _reported_runs(instance: DagsterInstance, after: float) -> set[str]:
    """The runs whose marker event (a materialization or observation tagged with
    :data:`TAG_RUN`) the event log holds. A marker is stored after its run ended, so one
    scan of the events since the oldest candidate's end (`after`, less the clock-skew
    allowance) answers for every candidate at once."""
    found: set[str] = set()
    for kind in (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION):
        cursor = None
        while True:
            flt = EventRecordsFilter(event_type=kind, after_timestamp=after, after_cursor=cursor)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # get_event_records is the one cross-key query
                records = instance.get_event_records(flt, limit=1000, ascending=True)
            for r in records:
                e = r.asset_materialization or r.asset_observation
                tag = (e.tags or {}).get(TAG_RUN) if e is not None else None
                if tag:
                    found.add(tag)
            if len(records) < 1000:
                break
            cursor = records[-1].storage_id
    return found


def _ended_at(status: Mapping[str, Any]) -> float:
    """When the run's status last changed: the newest condition transition or end time."""
    times = [c.get("lastTransitionTime") for c in status.get("conditions") or []]
    times.append(status.get("endTime"))
    best = 0.0
    for t in times:
        if isinstance(t, str):
            try:
                best = max(best, datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp())
            except ValueError:
                continue
    return best


def _since(cursor: str | None) -> float | None:
    if not cursor:
        return None
    try:
        value = json.loads(cursor).get("since")
        return float(value) if value is not None else None
    except (ValueError, AttributeError, TypeError):
        return None


def build_slurm_asset_sensor(
    store: SlurmAssetStore,
    *,
    name: str = "slurm_asset_sensor",
    label_selector: str | None = None,
    minimum_interval_seconds: int = 30,
    lookback_seconds: float = 600.0,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
    description: str | None = None,
) -> SensorDefinition:
    """A sensor reporting every `SlurmAsset` run that ended, except those a
    :class:`PipesSlurmAssetClient` launched (their step reports them): a success becomes an
    ``AssetMaterialization`` (payload metadata plus Slurm facts, in its partition), a failure or
    cancellation an ``AssetObservation`` with the reason, exit code and log tail, and check
    results ``AssetCheckEvaluation``s. Each run is reported once, across ticks, restarts of
    the daemon and lost cursor updates.
    """

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=description or f"Reports SlurmAsset runs that ended, from {store.describe()}",
    )
    def _sensor(context: SensorEvaluationContext) -> SensorResult:
        report = report_ended_runs(
            context.instance,
            store,
            context.cursor,
            label_selector=label_selector,
            lookback_seconds=lookback_seconds,
        )
        context.log.info(
            f"{report.objects} objects, {report.candidates} ended recently, "
            f"{report.already_reported} already reported, {len(report.events)} events "
            f"in {report.seconds:.2f}s"
        )
        return SensorResult(asset_events=report.events, cursor=report.cursor)

    return _sensor


def slurm_asset_specs(
    store: SlurmAssetStore, *, label_selector: str | None = None, group_name: str | None = None
) -> Sequence[AssetSpec]:
    """One ``AssetSpec`` (``kinds={"slurm"}``) per asset key among the store's objects, so that
    assets applied outside Dagster appear in the asset graph. Description from the annotation
    ``dagster-slurm.io/description``; owners from the label ``dagster-slurm.io/owner`` (a team)
    and the annotation ``dagster-slurm.io/owners`` (comma-separated e-mails or ``team:x``);
    group from the label ``dagster-slurm.io/group``."""
    selector = ",".join(x for x in (label_selector, f"!{LAUNCHED_BY}") if x)
    specs: dict[AssetKey, AssetSpec] = {}
    for obj in sorted(store.list(selector), key=lambda o: o["metadata"]["name"]):
        key_text = asset_key_of(obj)
        if not key_text:
            continue
        key = AssetKey.from_escaped_user_string(key_text)
        if key in specs:
            continue
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        ann = meta.get("annotations") or {}
        owners = []
        if labels.get("dagster-slurm.io/owner"):
            owners.append(f"team:{labels['dagster-slurm.io/owner']}")
        owners += [
            o.strip() for o in str(ann.get("dagster-slurm.io/owners", "")).split(",") if o.strip()
        ]
        where = f"{meta.get('namespace', store.namespace)}/{meta['name']}"
        specs[key] = AssetSpec(
            key=key,
            description=ann.get("dagster-slurm.io/description")
            or f"Computed on Slurm by the SlurmAsset {where}",
            kinds={"slurm"},
            owners=owners,
            group_name=labels.get("dagster-slurm.io/group") or group_name,
            metadata={"slurm/object": MetadataValue.text(where)},
        )
    return list(specs.values())


def end_finished_run_sessions(instance: DagsterInstance, store: SlurmAssetStore) -> list[str]:
    """Deletes the `SlurmSession` of every Dagster run that has finished (success, failure or
    cancellation): its allocation ends with the run, not an idle timeout later. Returns the
    names deleted."""
    deleted = []
    for obj in store.list_sessions(f"{LAUNCHED_BY}=dagster"):
        meta = obj.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        run_id = (meta.get("labels") or {}).get("dagster/run-id")
        run = instance.get_run_by_id(run_id) if run_id else None
        if run is not None and run.is_finished:
            store.delete_session(meta.get("name", ""))
            deleted.append(meta.get("name", ""))
    return deleted


def build_run_session_cleanup_sensor(
    store: SlurmAssetStore,
    *,
    name: str = "slurm_run_session_cleanup",
    minimum_interval_seconds: int = 30,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> SensorDefinition:
    """A sensor that ends the per-run sessions (``PipesSlurmAssetClient(run_session=...)``)
    of runs that have finished."""

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=f"Deletes the SlurmSessions of finished Dagster runs, in {store.describe()}",
    )
    def _sensor(context: SensorEvaluationContext) -> SkipReason:
        gone = end_finished_run_sessions(context.instance, store)
        return SkipReason(f"ended sessions: {', '.join(gone)}" if gone else "no session to end")

    return _sensor
