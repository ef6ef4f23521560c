"""`PipesSlurmAssetClient`: run a Dagster asset's compute as a `SlurmAsset`.

The client writes a `SlurmAsset` whose name and ``runKey`` follow from the asset key, the
partition and the Dagster run ID, hands the step's whole Pipes context to the operator through
``spec.pipesContext``, then follows the object's status: the payload's log messages and output
reach the run's logs as they arrive, and at the end its materializations, check results and
custom messages become the step's results, with the Slurm facts as metadata.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from dagster import (
    AssetExecutionContext,
    DagsterExecutionInterruptedError,
    Failure,
    MetadataValue,
    OpExecutionContext,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesContextInjector,
    PipesMessageReader,
    open_pipes_session,
)
from dagster._annotations import public
from dagster._core.definitions.resource_annotation import TreatAsResourceParam
from dagster._core.pipes.context import PipesMessageHandler
from dagster_pipes import PipesContextData, PipesExtras, PipesParams

from .names import label_value, object_name, session_name
from .spec import SlurmJob
from .status import TERMINAL, metrics_pending, slurm_metadata, summary_of_failure
from .store import API_VERSION, KIND, SESSION_KIND, SlurmAssetObject, SlurmAssetStore

#: Label on every object this client creates; the sensor leaves them alone (the step that
#: created one reports its results itself).
LAUNCHED_BY = "dagster-slurm.io/launched-by"
ANN_RETRY = "dagster-slurm.io/dagster-retry-number"
ANN_ASSET_KEY = "dagster-slurm.io/dagster-asset-key"
ANN_PARTITION = "dagster-slurm.io/dagster-partition-key"


class _SpecContextInjector(PipesContextInjector):
    """The context travels in ``spec.pipesContext``; the operator writes it into the run dir
    and sets ``DAGSTER_PIPES_CONTEXT`` for the payload."""

    @contextmanager
    def inject_context(self, context_data: PipesContextData) -> Iterator[PipesParams]:
        yield {}

    def no_messages_debug_text(self) -> str:
        return "The Pipes context was passed to the slurm-asset-operator in spec.pipesContext."


class _StatusMessageReader(PipesMessageReader):
    """The operator reads the payload's message file and puts the messages into the
    object's status; the client feeds them to the handler as it polls."""

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        yield {}

    def no_messages_debug_text(self) -> str:
        return (
            "Messages are read by the slurm-asset-operator into status.pipes; check the "
            "object's status.logTail for the payload's output."
        )


@dataclass
class _Follower:
    """What of one run's status has been passed on to Dagster already."""

    attempt_key: tuple[Any, ...] | None = None
    log_index: int = 0
    upto: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    opened: bool = False


def hetjob_spec(components: Mapping[str, tuple[str, SlurmJob]]) -> dict[str, Any]:
    """The spec of one heterogeneous job of ``components`` (name → (asset key, job)): each
    job's payload, resources and launcher become its component; the first job's cluster,
    environment, retries and debug flag are the job's; the jobs' env variables are merged."""
    if len(components) < 2:
        raise ValueError("run_hetjob: a heterogeneous job has two or more components")
    specs = {name: job.to_spec() for name, (_, job) in components.items()}
    first = next(iter(specs.values()))
    base: dict[str, Any] = {
        k: v for k, v in first.items() if k in ("clusterRef", "environment", "retry", "debug")
    }
    merged_env: dict[str, Any] = {}
    for spec in specs.values():
        merged_env.update({e["name"]: e for e in spec.get("env", [])})
    if merged_env:
        base["env"] = list(merged_env.values())
    base["components"] = []
    for name, (key, _) in components.items():
        component: dict[str, Any] = {
            "name": name,
            "assetKey": key,
            "resources": specs[name].get("resources", {}),
            "payload": specs[name]["payload"],
        }
        if "launcher" in specs[name]:
            component["launcher"] = specs[name]["launcher"]
        base["components"].append(component)
    return base


class PipesSlurmAssetClient(PipesClient, TreatAsResourceParam):
    """A Dagster Pipes client that runs the payload as a `SlurmAsset`.

    Args:
        store: Where the objects live (:class:`KubernetesStore` or :class:`DirectoryStore`).
        cluster: Default `SlurmCluster` name for specs that do not name one.
        poll_interval: Seconds between status reads while waiting.
        forward_termination: Delete the object (which cancels the job) when the Dagster run is
            terminated.
        forward_output: Where the payload's stdout/stderr go while it runs: ``"log"`` (the
            run's event log, line by line), ``"stdout"`` (the step's own stdout/stderr, i.e.
            Dagster's compute logs) or ``"none"``.
        metrics_wait: Seconds to wait after the end for accounting to fill in the metrics.
        run_session: A `SlurmSession` spec (camelCase; ``clusterRef`` defaults to ``cluster``):
            every step of one Dagster run then runs in one allocation that the run owns (the
            seed's per-run allocation), created by the run's first step. Delete it when the
            run ends with :func:`build_run_session_cleanup_sensor` (its ``idleTimeout`` ends
            it anyway).
    """

    def __init__(
        self,
        store: SlurmAssetStore,
        *,
        cluster: str | None = None,
        poll_interval: float = 1.0,
        forward_termination: bool = True,
        forward_output: Literal["log", "stdout", "none"] = "log",
        metrics_wait: float = 60.0,
        run_session: Mapping[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.run_session = dict(run_session) if run_session is not None else None
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.forward_termination = forward_termination
        self.forward_output = forward_output
        self.metrics_wait = metrics_wait

    @public
    def run(  # type: ignore[override]
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        spec: SlurmJob | Mapping[str, Any] | None = None,
        template: str | None = None,
        extras: PipesExtras | None = None,
        env: Mapping[str, str] | None = None,
    ) -> PipesClientCompletedInvocation:
        """Runs the step's compute as a `SlurmAsset` and waits for it.

        Args:
            context: The asset's (or op's) execution context.
            spec: A :class:`SlurmJob`, or a `SlurmAsset` spec as a dict (camelCase fields).
            template: Instead of ``spec``: the name of a `SlurmAsset` in the store whose spec is
                copied (keep templates ``suspend: true`` so they never run themselves).
            extras: Free JSON the payload reads with ``context.get_extra(...)``.
            env: Environment variables for the payload, over those of the spec.

        Returns:
            The invocation; ``yield from client.run(...).get_results()`` in the asset.
        """
        base = self._base_spec(spec, template)
        with open_pipes_session(
            context=context,
            context_injector=_SpecContextInjector(),
            message_reader=_StatusMessageReader(),
            extras=extras,
        ) as session:
            manifest = self._manifest(context, base, session.context_data, env)
            if self.run_session is not None:
                self._join_run_session(context, manifest, session.context_data["run_id"])
            name = manifest["metadata"]["name"]
            run_key = self._adopt_or_create(context, manifest)
            try:
                final = self._follow(context, session.message_handler, name, run_key)
            except (DagsterExecutionInterruptedError, KeyboardInterrupt):
                if self.forward_termination:
                    context.log.info(
                        f"[slurm] run terminated: deleting SlurmAsset {name}, which cancels its job"
                    )
                    self.store.delete(name)
                raise
            metadata = slurm_metadata(final, self.store.namespace)
            status = final.get("status") or {}
            if status.get("phase") != "Succeeded":
                raise Failure(
                    description=summary_of_failure(final),
                    metadata={
                        **metadata,
                        "slurm/stdout_tail": MetadataValue.md(
                            _code((status.get("logTail") or {}).get("stdout", ""))
                        ),
                        "slurm/stderr_tail": MetadataValue.md(
                            _code((status.get("logTail") or {}).get("stderr", ""))
                        ),
                    },
                )
            self._report_results(session.message_handler, final)
        return PipesClientCompletedInvocation(session, metadata=metadata)

    @public
    def run_hetjob(
        self,
        *,
        context: OpExecutionContext | AssetExecutionContext,
        components: Mapping[str, tuple[str, SlurmJob]],
        extras: PipesExtras | None = None,
        env: Mapping[str, str] | None = None,
    ) -> PipesClientCompletedInvocation:
        """Runs several assets of one multi-asset as one heterogeneous Slurm job (the seed's
        ``run_hetjob``): queued once, each component with its own payload and resources,
        each reporting its materializations under its own asset key.

        Args:
            context: The multi-asset's execution context.
            components: Component name (a DNS label) → (asset key as ``a/b``, its job). The
                first job's cluster and environment are the job's.
            extras: Free JSON every payload reads with ``context.get_extra(...)``.
            env: Environment variables for every payload, over those of the jobs.

        Returns:
            The invocation; ``yield from client.run_hetjob(...).get_results()``.
        """
        base = hetjob_spec(components)
        if self.cluster and "clusterRef" not in base:
            base["clusterRef"] = self.cluster
        return self.run(context=context, spec=base, extras=extras, env=env)

    # --- building the object ----------------------------------------------------------

    def _base_spec(
        self, spec: SlurmJob | Mapping[str, Any] | None, template: str | None
    ) -> dict[str, Any]:
        if (spec is None) == (template is None):
            raise ValueError("give exactly one of spec and template")
        if isinstance(spec, SlurmJob):
            base = spec.to_spec()
        elif spec is not None:
            base = dict(spec)
        else:
            obj = self.store.get(template or "")
            if obj is None or "spec" not in obj:
                raise Failure(
                    description=(
                        f"SlurmAsset template {template!r} not found in {self.store.describe()}"
                    )
                )
            base = dict(obj["spec"])
            for k in ("suspend", "runKey", "pipesContext"):
                base.pop(k, None)
        if self.cluster and "clusterRef" not in base:
            base["clusterRef"] = self.cluster
        return base

    def _manifest(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        base: dict[str, Any],
        data: PipesContextData,
        env: Mapping[str, str] | None,
    ) -> SlurmAssetObject:
        asset_keys = list(data.get("asset_keys") or [])
        primary = asset_keys[0] if asset_keys else context.op.name
        partition = data.get("partition_key")
        run_id = data["run_id"]
        name = object_name(primary, partition, run_id)
        spec = dict(base)
        spec["assetKey"] = primary
        spec["runKey"] = run_id
        spec["suspend"] = False
        spec["pipesContext"] = _pipes_context_spec(data)
        if data.get("extras"):
            spec["extras"] = dict(data["extras"])
        if env:
            merged = {e["name"]: e for e in spec.get("env", [])}
            merged.update({k: {"name": k, "value": v} for k, v in env.items()})
            spec["env"] = list(merged.values())
        labels = {
            LAUNCHED_BY: "dagster",
            "dagster/run-id": label_value(run_id),
            "dagster/asset-key": label_value(primary),
        }
        location = _code_location(context)
        if location:
            labels["dagster/code-location"] = label_value(location)
        if partition:
            labels["dagster/partition"] = label_value(partition)
        annotations = {
            ANN_ASSET_KEY: primary,
            ANN_RETRY: str(data.get("retry_number") or 0),
        }
        if partition:
            annotations[ANN_PARTITION] = partition
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": spec,
        }

    def _join_run_session(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        manifest: SlurmAssetObject,
        run_id: str,
    ) -> None:
        """Points the step at its run's session, creating the session on the run's first
        step (create-if-absent: concurrent steps make one)."""
        spec = dict(self.run_session or {})
        cluster = spec.get("clusterRef") or manifest["spec"].get("clusterRef") or self.cluster
        if not cluster:
            raise ValueError("run_session needs a cluster: give clusterRef or the client's cluster")
        spec["clusterRef"] = cluster
        name = session_name(run_id)
        created = self.store.create_session(
            {
                "apiVersion": API_VERSION,
                "kind": SESSION_KIND,
                "metadata": {
                    "name": name,
                    "labels": {
                        LAUNCHED_BY: "dagster",
                        "dagster/run-id": label_value(run_id),
                    },
                },
                "spec": spec,
            }
        )
        if created:
            context.log.info(f"[slurm] created SlurmSession {name} for this run")
        manifest["spec"]["sessionRef"] = name
        manifest["spec"]["clusterRef"] = cluster

    def _adopt_or_create(
        self, context: OpExecutionContext | AssetExecutionContext, manifest: SlurmAssetObject
    ) -> str:
        """Creates the object, or adopts the one an earlier attempt of this step created.
        Returns the ``runKey`` to follow."""
        name = manifest["metadata"]["name"]
        obj, created = self.store.create(manifest)
        if created:
            context.log.info(f"[slurm] created SlurmAsset {name} in {self.store.describe()}")
            return manifest["spec"]["runKey"]
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        run_key = spec.get("runKey") or manifest["spec"]["runKey"]
        retry = int(manifest["metadata"]["annotations"][ANN_RETRY])
        seen = int(((obj.get("metadata") or {}).get("annotations") or {}).get(ANN_RETRY) or 0)
        failed = status.get("runKey") == run_key and status.get("phase") in ("Failed", "Cancelled")
        if failed and retry > seen:
            # A Dagster retry of a step whose job failed: a new run of the same object.
            new_spec = dict(manifest["spec"])
            new_spec["runKey"] = f"{manifest['spec']['runKey']}-retry-{retry}"
            self.store.replace_spec(name, new_spec, {ANN_RETRY: str(retry)})
            context.log.info(
                f"[slurm] retry {retry}: SlurmAsset {name} runs again (runKey {new_spec['runKey']})"
            )
            return new_spec["runKey"]
        context.log.info(
            f"[slurm] adopted SlurmAsset {name} (phase {status.get('phase', 'Pending')}, "
            f"job {status.get('jobId', '-')}): an earlier attempt of this step created it"
        )
        return run_key

    # --- following the run ------------------------------------------------------------

    def _follow(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        handler: PipesMessageHandler,
        name: str,
        run_key: str,
    ) -> SlurmAssetObject:
        follower = _Follower()
        ended_at: float | None = None
        last_phase: tuple[Any, Any] | None = None
        while True:
            obj = self.store.get(name)
            if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
                raise Failure(
                    description=f"SlurmAsset {name} was deleted while the step waited for it"
                )
            status = obj.get("status") or {}
            invalid = _invalid_message(obj)
            if invalid is not None:
                raise Failure(description=f"SlurmAsset {name} is invalid: {invalid}")
            ours = status.get("runKey") == run_key
            if ours:
                phase = status.get("phase")
                # A queued job's pending reason (squeue's: Priority, Resources, ...) is news too.
                seen = (phase, status.get("reason"))
                if seen != last_phase:
                    detail = f": {status['message']}" if status.get("message") else ""
                    context.log.info(
                        f"[slurm] {name}: {phase} (job {status.get('jobId', '-')}){detail}"
                    )
                    last_phase = seen
                terminal = phase in TERMINAL
                self._pass_on(context, handler, status, follower, final=terminal)
                if terminal:
                    ended_at = ended_at or time.monotonic()
                    waited = time.monotonic() - ended_at
                    if not metrics_pending(status) or waited >= self.metrics_wait:
                        return obj
            time.sleep(self.poll_interval)

    def _pass_on(
        self,
        context: OpExecutionContext | AssetExecutionContext,
        handler: PipesMessageHandler,
        status: Mapping[str, Any],
        f: _Follower,
        *,
        final: bool,
    ) -> None:
        """Hands what is new in `status` to Dagster: Pipes log messages and output lines."""
        attempt = (status.get("run"), status.get("attempts"), status.get("jobId"))
        if attempt != f.attempt_key:
            if f.attempt_key is not None and attempt[2]:
                context.log.info(f"[slurm] attempt {attempt[1]}: job {attempt[2]}")
            f.attempt_key = attempt
            f.log_index = 0
            f.upto = {"stdout": 0, "stderr": 0}
        pipes = status.get("pipes") or {}
        if pipes.get("opened") and not f.opened:
            f.opened = True
            handler.handle_message(
                {"__dagster_pipes_version": "0.1", "method": "opened", "params": {}}
            )
        # `index` counts every message of the stream, results too: gaps are normal.
        logs = pipes.get("logs") or []
        for entry in logs:
            if entry.get("index", 0) > f.log_index:
                f.log_index = entry["index"]
                handler.handle_message(
                    {
                        "__dagster_pipes_version": "0.1",
                        "method": "log",
                        "params": {
                            "message": entry.get("message", ""),
                            "level": entry.get("level", "INFO"),
                        },
                    }
                )
        tail = status.get("logTail") or {}
        for stream in ("stdout", "stderr"):
            lines, f.upto[stream], skipped = new_output(
                tail.get(stream, ""), tail.get(f"{stream}Bytes"), f.upto[stream], final=final
            )
            if self.forward_output == "none":
                continue
            if skipped:
                self._emit(context, stream, f"... ({skipped} bytes not shown)")
            for line in lines:
                self._emit(context, stream, line)

    def _emit(
        self, context: OpExecutionContext | AssetExecutionContext, stream: str, line: str
    ) -> None:
        if self.forward_output == "log":
            context.log.info(f"[{stream}] {line}")
        else:
            out = sys.stdout if stream == "stdout" else sys.stderr
            out.write(line + "\n")
            out.flush()

    def _report_results(self, handler: PipesMessageHandler, obj: SlurmAssetObject) -> None:
        """The payload's materializations, checks and custom messages, as Pipes messages."""
        status = obj.get("status") or {}
        spec = obj.get("spec") or {}
        primary = spec.get("assetKey", "")

        def msg(method: str, params: Mapping[str, Any]) -> None:
            handler.handle_message(
                {"__dagster_pipes_version": "0.1", "method": method, "params": params}
            )

        # A heterogeneous job's components with payloads of their own report through their
        # own channels, each under its own asset key.
        keys = {c.get("name"): c.get("assetKey") for c in spec.get("components") or []}
        channels = [(status.get("pipes") or {}, primary)]
        for c in status.get("components") or []:
            if c.get("pipes"):
                channels.append((c["pipes"], keys.get(c.get("name")) or primary))
        if len(channels) > 1:
            opened = any(p.get("opened") for p, _ in channels[1:])
            if opened and not (status.get("pipes") or {}).get("opened"):
                msg("opened", {})
            for p, _ in channels[1:]:
                for entry in p.get("logs") or []:
                    msg(
                        "log",
                        {"message": entry.get("message", ""), "level": entry.get("level", "INFO")},
                    )
            closed = all(p.get("closed") for p, _ in channels[1:])
            channels = channels[1:]
        else:
            closed = bool(channels[0][0].get("closed"))
        for pipes, key in channels:
            self._report_channel(msg, pipes, key)
        if closed:
            msg("closed", {})

    @staticmethod
    def _report_channel(msg: Any, pipes: Mapping[str, Any], primary: str) -> None:
        """One Pipes channel's results: materializations, checks and custom messages."""
        for m in pipes.get("materializations") or []:
            msg(
                "report_asset_materialization",
                {
                    "asset_key": m.get("assetKey") or primary,
                    "metadata": m.get("metadata") or {},
                    "data_version": m.get("dataVersion"),
                },
            )
        for c in pipes.get("checkResults") or []:
            msg(
                "report_asset_check",
                {
                    "asset_key": c.get("assetKey") or primary,
                    "check_name": c["checkName"],
                    "passed": bool(c.get("passed")),
                    "severity": c.get("severity") or "ERROR",
                    "metadata": c.get("metadata") or {},
                },
            )
        for payload in pipes.get("customMessages") or []:
            msg("report_custom_message", {"payload": payload})


def new_output(
    tail: str, size: int | None, upto: int, *, final: bool
) -> tuple[list[str], int, int]:
    """The lines of a stream not passed on yet.

    ``tail`` is a byte-exact suffix of the stream and ``size`` the stream's length at that
    moment (``status.logTail``); ``upto`` is how far lines were passed on. While the job runs
    only complete lines go; at the end the unfinished last line too. Returns the lines, the
    new ``upto`` and how many bytes fell between two reads (more than the tail holds).
    """
    if size is None or size <= upto:
        return [], upto, 0
    data = tail.encode("utf-8", errors="replace")
    start = size - len(data)
    skipped = max(0, start - upto)
    chunk = data[max(0, upto - start) :]
    if not final:
        cut = chunk.rfind(b"\n")
        if cut < 0:
            return [], upto if not skipped else start, skipped
        chunk = chunk[: cut + 1]
    new_upto = max(upto, start) + len(chunk)
    return chunk.decode("utf-8", errors="replace").splitlines(), new_upto, skipped


def _pipes_context_spec(data: PipesContextData) -> dict[str, Any]:
    """`PipesContextData` as ``spec.pipesContext`` (camelCase, no nulls, no extras)."""
    out: dict[str, Any] = {}
    if data.get("asset_keys"):
        out["assetKeys"] = list(data["asset_keys"] or [])
    versions = data.get("code_version_by_asset_key")
    if versions:
        out["codeVersionByAssetKey"] = {k: v for k, v in versions.items() if v is not None}
    provenance = data.get("provenance_by_asset_key")
    if provenance:
        kept = {k: v for k, v in provenance.items() if v is not None}
        if kept:
            out["provenanceByAssetKey"] = kept
    if data.get("partition_key") is not None:
        out["partitionKey"] = data["partition_key"]
    for src, dst in (
        ("partition_key_range", "partitionKeyRange"),
        ("partition_time_window", "partitionTimeWindow"),
    ):
        r = data.get(src)
        if r:
            out[dst] = {"start": r["start"], "end": r["end"]}
    out["runId"] = data["run_id"]
    if data.get("job_name"):
        out["jobName"] = data["job_name"]
    out["retryNumber"] = int(data.get("retry_number") or 0)
    return out


def _code_location(context: OpExecutionContext | AssetExecutionContext) -> str | None:
    try:
        origin = context.run.remote_job_origin
        return origin.location_name if origin else None
    except Exception:
        return None


def _invalid_message(obj: SlurmAssetObject) -> str | None:
    """The `Invalid` condition's message when it holds for the object's current spec."""
    meta = obj.get("metadata") or {}
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Invalid" and c.get("status") == "True":
            gen = c.get("observedGeneration")
            if gen is None or meta.get("generation") is None or gen == meta.get("generation"):
                return c.get("message") or c.get("reason") or "invalid spec"
    return None


def _code(text: str) -> str:
    return f"```\n{text.rstrip()}\n```" if text.strip() else "(empty)"


__all__: Sequence[str] = ["PipesSlurmAssetClient", "new_output"]
