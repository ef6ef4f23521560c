"""The Pipes client against the real operator: standalone (local and over the real Slurm)."""

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from conftest import PAYLOADS, sacct_jobs, wait_until

from dagster_slurm_asset import (
    DirectoryStore,
    PipesSlurmAssetClient,
    SlurmAssetStore,
    SlurmJob,
    SlurmResources,
    end_finished_run_sessions,
    object_name,
    session_name,
)

PARTITIONS = dg.DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-05")


def partitioned_asset(client: PipesSlurmAssetClient, extras: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(
        name="daily_rows",
        key_prefix=["analytics"],
        partitions_def=PARTITIONS,
        check_specs=[
            dg.AssetCheckSpec("non_empty", asset=dg.AssetKey(["analytics", "daily_rows"]))
        ],
    )
    def daily_rows(context: dg.AssetExecutionContext):
        invocation = client.run(
            context=context, spec=SlurmJob(script=PAYLOADS / "partitioned.py"), extras=extras
        )
        context.log.info(f"custom messages: {invocation.get_custom_messages()}")
        yield from invocation.get_results()

    return daily_rows


def _user_messages(instance: dg.DagsterInstance) -> list[str]:
    out = []
    for run in instance.get_runs():
        for e in instance.all_logs(run.run_id):
            out.append(e.user_message or "")
    return out


def _materialize_releasing(
    instance: dg.DagsterInstance, asset: dg.AssetsDefinition, release: Path, partition: str
) -> dg.ExecuteInProcessResult:
    """Materializes in a thread; creates `release` (which the payload waits for) only once
    the run's logs hold the line the payload printed first."""
    result: dict[str, Any] = {}

    def go() -> None:
        result["r"] = dg.materialize([asset], instance=instance, partition_key=partition)

    t = threading.Thread(target=go)
    t.start()
    try:
        wait_until(
            "the payload's first line in the run's logs",
            lambda: any(f"early line partition={partition}" in m for m in _user_messages(instance)),
            timeout=180,
        )
        assert not release.exists(), "the payload cannot have finished: it waits for this file"
        messages = _user_messages(instance)
        assert any(f"pipes log partition={partition}" in m for m in messages), messages
    finally:
        release.touch()
        os.chmod(release, 0o644)
        t.join(300)
    assert "r" in result, "materialize did not return"
    return result["r"]


def _check_materialization(result: dg.ExecuteInProcessResult, partition: str, local: bool) -> dict:
    assert result.success
    mats = result.asset_materializations_for_node("analytics__daily_rows")
    assert len(mats) == 1
    m = mats[0]
    assert m.partition == partition
    md = {k: v.value for k, v in m.metadata.items()}
    assert md["partition"] == partition
    assert md["rows"] == 7
    assert md["window_start"].startswith(partition)
    assert md["slurm/phase"] == "Succeeded"
    assert md["slurm/exit_code"] == 0
    assert md["slurm/job_id"].isdigit()
    assert md["slurm/elapsed_seconds"] >= 0
    if not local:
        # Accounting figures from sacct, seff-style.
        # (Max RSS is sampled: a job this short may end before the first sample.)
        for k in (
            "slurm/cpu_efficiency",
            "slurm/node_hours",
            "slurm/alloc_cpus",
        ):
            assert k in md, (k, md)
        assert md["slurm/state"] == "COMPLETED"
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("non_empty", True)]
    return md


@pytest.mark.parametrize("cluster", ["laptop", "hpc"])
def test_partitioned_asset_runs_through_the_operator(
    standalone, tmp_path: Path, cluster: str
) -> None:
    d, _ = standalone()
    store = DirectoryStore(d)
    release = Path("/tmp") / f"sao-release-{uuid.uuid4().hex}"
    client = PipesSlurmAssetClient(store, cluster=cluster, poll_interval=0.2)
    asset = partitioned_asset(client, {"rows": 7, "release_file": str(release)})
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = _materialize_releasing(instance, asset, release, "2026-11-02")
    finally:
        release.unlink(missing_ok=True)
    md = _check_materialization(result, "2026-11-02", local=cluster == "laptop")
    messages = _user_messages(instance)
    assert any("[stdout] done partition=2026-11-02" in m for m in messages)
    assert any("custom messages: ({'partition': '2026-11-02'},)" in m for m in messages), messages
    # The object carries the Dagster facts, findable by label.
    (obj,) = [
        o
        for o in store.list("dagster/run-id")
        if o["metadata"]["labels"]["dagster/run-id"] == result.run_id
    ]
    assert obj["status"]["jobId"] == md["slurm/job_id"]
    full = store.get(obj["metadata"]["name"])
    assert full["spec"]["pipesContext"]["partitionKey"] == "2026-11-02"
    assert full["spec"]["pipesContext"]["partitionTimeWindow"]["start"].startswith("2026-11-02")
    assert full["spec"]["runKey"] == result.run_id
    if cluster == "hpc":
        jobs = wait_until("the job in sacct", lambda: sacct_jobs(obj["metadata"]["uid"]))
        assert [j[2] for j in jobs] == [md["slurm/job_id"]]


def test_the_same_step_twice_submits_one_job(standalone) -> None:
    d, _ = standalone()
    store = DirectoryStore(d)
    client = PipesSlurmAssetClient(store, cluster="hpc", poll_interval=0.2)
    asset = partitioned_asset(client, {"rows": 7})
    job = dg.Definitions(assets=[asset]).get_implicit_global_asset_job_def()
    run_id = str(uuid.uuid4())
    results = [
        job.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), run_id=run_id, partition_key="2026-11-03"
        )
        for _ in range(2)
    ]
    ids = []
    for r in results:
        (m,) = r.asset_materializations_for_node("analytics__daily_rows")
        ids.append(m.metadata["slurm/job_id"].value)
    assert ids[0] == ids[1]
    name = object_name("analytics/daily_rows", "2026-11-03", run_id)
    uid = store.get(name)["metadata"]["uid"]
    jobs = wait_until("the job in sacct", lambda: sacct_jobs(uid))
    assert len(jobs) == 1, jobs
    assert jobs[0][2] == ids[0]


def test_a_failing_payload_fails_the_step_with_its_exit_code_and_log_tail(standalone) -> None:
    d, _ = standalone()
    client = PipesSlurmAssetClient(DirectoryStore(d), cluster="hpc", poll_interval=0.2)
    asset = partitioned_asset(client, {"rows": 7, "exit_code": 3})
    result = dg.materialize([asset], partition_key="2026-11-01", raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    user = failure.step_failure_data.user_failure_data
    assert "Failed" in user.description and "exit code 3" in user.description, user.description
    assert "about to fail" in user.description
    md = {k: v.value for k, v in user.metadata.items()}
    assert md["slurm/exit_code"] == 3
    assert "about to fail" in md["slurm/stderr_tail"]
    assert md["slurm/job_id"].isdigit()


def test_the_pending_reason_of_a_queued_job_reaches_the_run_log(standalone) -> None:
    """A job Slurm holds (here: not before a begin time) says why in the Dagster run's log."""
    d, _ = standalone()
    client = PipesSlurmAssetClient(DirectoryStore(d), cluster="hpc", poll_interval=0.2)

    @dg.asset
    def held(context: dg.AssetExecutionContext):
        yield from client.run(
            context=context,
            spec=SlurmJob(
                inline="echo released",
                resources=SlurmResources(extra_sbatch_args=["--begin=now+4"]),
            ),
        ).get_results()

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([held], instance=instance)
    assert result.success
    messages = _user_messages(instance)
    assert any("Queued" in m and "pending in the queue: BeginTime" in m for m in messages), [
        m for m in messages if "[slurm]" in m
    ]


def test_a_multi_asset_reports_each_key(standalone) -> None:
    d, _ = standalone()
    client = PipesSlurmAssetClient(DirectoryStore(d), cluster="laptop", poll_interval=0.2)

    @dg.multi_asset(specs=[dg.AssetSpec("left"), dg.AssetSpec("right")])
    def pair(context: dg.AssetExecutionContext):
        yield from client.run(
            context=context, spec=SlurmJob(script=PAYLOADS / "multi.py")
        ).get_results()

    result = dg.materialize([pair])
    assert result.success
    mats = result.asset_materializations_for_node("pair")
    got = {m.asset_key.to_user_string(): m.metadata["key"].value for m in mats}
    assert got == {"left": "left", "right": "right"}


def test_a_multi_asset_runs_as_one_heterogeneous_job(standalone) -> None:
    """The seed's run_hetjob: two assets, each its own component (payload and resources),
    queued once; each materialization under its own key."""
    d, _ = standalone()
    store = DirectoryStore(d)
    client = PipesSlurmAssetClient(store, cluster="hpc", poll_interval=0.2)

    @dg.multi_asset(specs=[dg.AssetSpec(["het", "prep"]), dg.AssetSpec(["het", "train"])])
    def pipeline(context: dg.AssetExecutionContext):
        yield from client.run_hetjob(
            context=context,
            components={
                "prep": ("het/prep", SlurmJob(script=PAYLOADS / "multi.py")),
                "train": (
                    "het/train",
                    SlurmJob(
                        script=PAYLOADS / "multi.py",
                        resources=SlurmResources(cpus_per_task=2, mem="300M"),
                    ),
                ),
            },
        ).get_results()

    result = dg.materialize([pipeline])
    assert result.success
    mats = result.asset_materializations_for_node("pipeline")
    got = {m.asset_key.to_user_string(): m.metadata["key"].value for m in mats}
    assert got == {"het/prep": "het/prep", "het/train": "het/train"}
    jobs = {m.metadata["slurm/job_id"].value for m in mats}
    assert len(jobs) == 1, jobs
    obj = store.get(object_name("het/prep", None, result.run_id))
    assert obj is not None
    comps = obj["status"]["components"]
    (job,) = jobs
    assert [c["jobId"] for c in comps] == [f"{job}+0", f"{job}+1"]
    assert [c["exitCode"] for c in comps] == [0, 0]


TERMINATED = """
import sys
import dagster as dg
from dagster_slurm_asset import DirectoryStore, PipesSlurmAssetClient, SlurmJob

client = PipesSlurmAssetClient(DirectoryStore(sys.argv[1]), cluster="hpc", poll_interval=0.2)

@dg.asset
def sleepy(context):
    yield from client.run(context=context, spec=SlurmJob(script=sys.argv[2])).get_results()

dg.materialize([sleepy], raise_on_error=False)
"""


def test_a_terminated_run_cancels_the_job(standalone, tmp_path: Path) -> None:
    d, _ = standalone()
    store = DirectoryStore(d)
    script = tmp_path / "terminated.py"
    script.write_text(TERMINATED)
    proc = subprocess.Popen([sys.executable, str(script), str(d), str(PAYLOADS / "sleeper.py")])
    try:
        running = wait_until(
            "the job to run",
            lambda: [o for o in store.list() if (o.get("status") or {}).get("phase") == "Running"],
            timeout=120,
        )
        obj = running[0]
        # What Dagster does to a run it terminates: interrupt the step's process.
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    name, uid = obj["metadata"]["name"], obj["metadata"]["uid"]
    assert not (d / "dagster" / f"{name}.yaml").exists(), "the object was deleted"
    wait_until(
        "the job to be CANCELLED in sacct",
        lambda: [j for j in sacct_jobs(uid) if j[1].startswith("CANCELLED")],
    )


def test_two_assets_of_one_run_share_the_runs_session(standalone) -> None:
    d, _ = standalone()
    two_assets_of_one_run_share_its_session(DirectoryStore(d))


def two_assets_of_one_run_share_its_session(store: SlurmAssetStore) -> None:
    """Two assets of one Dagster run, in the run's own session; the run's end ends it."""
    client = PipesSlurmAssetClient(
        store,
        cluster="hpc",
        poll_interval=0.2,
        run_session={
            "resources": {"nodes": 1, "ntasks": 2, "mem": "1000M", "timeLimit": "00:10:00"},
            "maxConcurrentSteps": 2,
            "idleTimeout": "30s",
        },
    )

    def make(name: str) -> dg.AssetsDefinition:
        @dg.asset(name=name, key_prefix=["sess"])
        def _asset(context: dg.AssetExecutionContext):
            yield from client.run(
                context=context, spec=SlurmJob(script=PAYLOADS / "multi.py")
            ).get_results()

        return _asset

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([make("first"), make("second")], instance=instance)
    assert result.success
    jobs = {}
    for node in ("sess__first", "sess__second"):
        (m,) = result.asset_materializations_for_node(node)
        jobs[node] = m.metadata["slurm/job_id"].value
    session = store.get_session(session_name(result.run_id))
    assert session is not None
    job = session["status"]["jobId"]
    assert set(jobs.values()) == {job}, (jobs, job)
    steps = set()
    for key in ("sess/first", "sess/second"):
        obj = store.get(object_name(key, None, result.run_id))
        assert obj["spec"]["sessionRef"] == session_name(result.run_id)
        steps.add(obj["status"]["stepId"])
    assert len(steps) == 2 and all(s.startswith(f"{job}.") for s in steps), steps
    # The run is over: the cleanup ends its session (its allocation is cancelled).
    assert end_finished_run_sessions(instance, store) == [session_name(result.run_id)]

    def session_phase() -> str | None:
        obj = store.get_session(session_name(result.run_id)) or {}
        return (obj.get("status") or {}).get("phase")

    # Ended, or (Kubernetes) gone once its finalizer saw the allocation cancelled.
    assert wait_until(
        "the session to end",
        lambda: (
            store.get_session(session_name(result.run_id)) is None or session_phase() == "Ended"
        ),
    )
