"""The sensor and the asset specs, evaluated with a real DagsterInstance over objects the real
standalone operator ran (applied outside Dagster, as `kubectl apply` or GitOps would)."""

import shutil
import time
import uuid
from pathlib import Path

import dagster as dg
import yaml
from conftest import PAYLOADS, wait_until

from dagster_slurm_asset import (
    TAG_RUN,
    DirectoryStore,
    build_slurm_asset_sensor,
    report_ended_runs,
    slurm_asset_specs,
)


def external(name: str, key: str, partition: str, extras: dict, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "dagster-slurm.io/v1alpha1",
        "kind": "SlurmAsset",
        "metadata": {
            "name": name,
            "labels": {"dagster-slurm.io/owner": "research", **(labels or {})},
        },
        "spec": {
            "assetKey": key,
            "clusterRef": "laptop",
            "payload": {"path": "partitioned.py"},
            "extras": extras,
            "pipesContext": {"partitionKey": partition},
        },
    }


def apply(d: Path, *objs: dict) -> None:
    for o in objs:
        (d / f"{o['metadata']['name']}.yaml").write_text(yaml.safe_dump(o))


def ended(store: DirectoryStore, *names: str) -> bool:
    return all(
        ((store.get(n) or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed")
        for n in names
    )


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None):
    """One evaluation, and what the sensor daemon does with its result: store the events."""
    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, dg.SensorResult)
    for e in result.asset_events:
        instance.report_runless_asset_event(e)
    return result


def test_each_ended_run_is_reported_once(standalone) -> None:
    d, _ = standalone()
    shutil.copy(PAYLOADS / "partitioned.py", d / "partitioned.py")
    store = DirectoryStore(d)
    apply(
        d,
        external("good", "lab/good", "p1", {"rows": 3}),
        external("bad", "lab/bad", "p1", {"rows": 0, "exit_code": 5}),
        # Launched by the Pipes client: its step reports it, the sensor must not.
        external(
            "mine", "lab/mine", "p1", {"rows": 1}, {"dagster-slurm.io/launched-by": "dagster"}
        ),
    )
    wait_until("the first runs to end", lambda: ended(store, "good", "bad", "mine"))
    sensor = build_slurm_asset_sensor(store)
    with dg.instance_for_test() as instance:
        first = tick(sensor, instance, None)
        kinds = sorted((type(e).__name__, e.asset_key.to_user_string()) for e in first.asset_events)
        assert kinds == [
            ("AssetCheckEvaluation", "lab/good"),
            ("AssetMaterialization", "lab/good"),
            ("AssetObservation", "lab/bad"),
        ], kinds
        # A run that ends between two ticks is reported by the next one, and only it.
        apply(d, external("later", "lab/later", "p2", {"rows": 9}))
        wait_until("the later run to end", lambda: ended(store, "later"))
        second = tick(sensor, instance, first.cursor)
        assert [
            e.asset_key.to_user_string()
            for e in second.asset_events
            if isinstance(e, dg.AssetMaterialization)
        ] == ["lab/later"]
        third = tick(sensor, instance, second.cursor)
        assert third.asset_events == []
        # A restarted daemon with a lost cursor, and a cursor update that was lost: nothing
        # is reported twice (the event log knows).
        restarted = build_slurm_asset_sensor(store)
        assert tick(restarted, instance, None).asset_events == []
        assert tick(restarted, instance, first.cursor).asset_events == []

        (good,) = instance.fetch_materializations(dg.AssetKey(["lab", "good"]), limit=10).records
        m = good.asset_materialization
        assert m.partition == "p1"
        assert m.metadata["rows"].value == 3
        assert m.metadata["partition"].value == "p1"
        assert m.metadata["slurm/phase"].value == "Succeeded"
        assert m.metadata["slurm/job_id"].value.isdigit()
        assert m.tags[TAG_RUN].startswith(store.get("good")["metadata"]["uid"])
        (bad,) = instance.fetch_observations(dg.AssetKey(["lab", "bad"]), limit=10).records
        o = bad.asset_observation
        assert o.metadata["slurm/exit_code"].value == 5
        assert "about to fail" in o.metadata["slurm/stderr_tail"].value
        assert instance.fetch_materializations(dg.AssetKey(["lab", "mine"]), limit=10).records == []

        # A new run of an object (its spec changed) is a new report.
        apply(d, external("good", "lab/good", "p1", {"rows": 4}))
        wait_until(
            "the second run of good",
            lambda: store.get("good")["status"].get("run") == 2 and ended(store, "good"),
        )
        fourth = tick(sensor, instance, third.cursor)
        mats = [e for e in fourth.asset_events if isinstance(e, dg.AssetMaterialization)]
        assert [e.metadata["rows"].value for e in mats] == [4]


def test_asset_specs_from_manifests(standalone) -> None:
    d, _ = standalone()
    shutil.copy(PAYLOADS / "partitioned.py", d / "partitioned.py")
    apply(
        d,
        external("one", "lab/one", "p1", {"rows": 1}),
        external("two", "lab/two", "p1", {"rows": 2}),
    )
    store = DirectoryStore(d)
    wait_until("status files", lambda: len(store.list()) == 2)
    specs = {s.key.to_user_string(): s for s in slurm_asset_specs(store)}
    assert set(specs) == {"lab/one", "lab/two"}
    assert specs["lab/one"].kinds == {"slurm"}
    assert specs["lab/one"].owners == ["team:research"]
    defs = dg.Definitions(assets=list(specs.values()), sensors=[build_slurm_asset_sensor(store)])
    assert defs.resolve_asset_graph().get(dg.AssetKey(["lab", "one"])) is not None


N = 500


def test_a_tick_over_many_objects(standalone) -> None:
    """Many status files (copies of one the operator wrote, renamed): every run is
    reported exactly once, and the tick's time is printed (docs/performance.md has the
    benchmark)."""
    d, _ = standalone()
    shutil.copy(PAYLOADS / "partitioned.py", d / "partitioned.py")
    apply(d, external("seed", "lab/seed", "p1", {"rows": 1}))
    store = DirectoryStore(d)
    wait_until("the seed run", lambda: ended(store, "seed"))
    fan_out(store, "seed", N - 1)
    with dg.instance_for_test() as instance:
        t0 = time.monotonic()
        report = report_ended_runs(instance, store, None)
        cold = time.monotonic() - t0
        for e in report.events:
            instance.report_runless_asset_event(e)
        assert report.objects == N
        mats = [e for e in report.events if isinstance(e, dg.AssetMaterialization)]
        assert len(mats) == N
        t0 = time.monotonic()
        again = report_ended_runs(instance, store, None)
        lost_cursor = time.monotonic() - t0
        assert again.events == [] and again.already_reported == N
        t0 = time.monotonic()
        steady = report_ended_runs(instance, store, report.cursor, now=time.time())
        steady_s = time.monotonic() - t0
        print(
            f"sensor tick over {N} objects: first {cold:.2f}s, "
            f"lost cursor {lost_cursor:.2f}s, steady {steady_s:.2f}s"
        )
        assert steady.events == []


def fan_out(store: DirectoryStore, seed: str, n: int) -> None:
    """`n` copies of `seed`'s status file under new names, UIDs and asset keys."""
    text = store.status_path(seed).read_text()
    doc = yaml.safe_load(text)
    for i in range(n):
        doc["metadata"]["name"] = f"copy-{i}"
        doc["metadata"]["uid"] = str(uuid.uuid4())
        doc["metadata"]["annotations"]["dagster-slurm.io/asset-key"] = f"lab/copy_{i}"
        doc["metadata"]["annotations"].pop("dagster-slurm.io/source", None)
        for m in doc["status"]["pipes"]["materializations"]:
            m["assetKey"] = f"lab/copy_{i}"
        store.status_path(f"copy-{i}").write_text(yaml.safe_dump(doc))
