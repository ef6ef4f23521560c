"""Benchmark: one sensor tick over N ended SlurmAssets (standalone store).

One asset is run for real by the operator (local mode); its status file is then copied N-1
times under new names, UIDs and asset keys. Prints the tick's time with no cursor (every run is
new), after a lost cursor (every run already reported: one event-log scan), and in steady state
(runs ended before the lookback window), plus the time Dagster's storage takes to store the
first tick's events (the daemon's share).

    .venv-dagster/bin/python integrations/dagster/bench/sensor_tick.py [N]
"""

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dagster as dg
import yaml

from dagster_slurm_asset import DirectoryStore, report_ended_runs

REPO = Path(__file__).resolve().parents[3]


def main(n: int) -> None:
    d = Path(tempfile.mkdtemp(prefix="sensor-bench-"))
    (d / "a.yaml").write_text(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {name: laptop}\n"
        "spec: {mode: local, pollInterval: 200ms}\n---\n"
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {name: seed}\n"
        "spec:\n  assetKey: bench/seed\n  clusterRef: laptop\n"
        "  payload:\n    interpreter: [python3]\n"
        "    inline: |\n      from dagster_pipes import open_dagster_pipes\n"
        "      with open_dagster_pipes() as p:\n"
        "          p.report_asset_materialization(metadata={'rows': 1})\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    binary = REPO / "target/release/slurm-asset-operator"
    if not binary.exists():
        binary = REPO / "target/debug/slurm-asset-operator"
    subprocess.run([str(binary), "standalone", "--dir", str(d), "--once"], env=env, check=True)
    store = DirectoryStore(d)
    seed = yaml.safe_load(store.status_path("seed").read_text())
    assert seed["status"]["phase"] == "Succeeded", seed["status"]
    for i in range(n - 1):
        seed["metadata"].update(name=f"copy-{i}", uid=str(uuid.uuid4()))
        seed["metadata"]["annotations"]["dagster-slurm.io/asset-key"] = f"bench/copy_{i}"
        seed["metadata"]["annotations"].pop("dagster-slurm.io/source", None)
        for m in seed["status"]["pipes"]["materializations"]:
            m["assetKey"] = f"bench/copy_{i}"
        store.status_path(f"copy-{i}").write_text(yaml.safe_dump(seed))
    with dg.instance_for_test() as instance:
        first = report_ended_runs(instance, DirectoryStore(d), None)
        t0 = time.monotonic()
        for e in first.events:
            instance.report_runless_asset_event(e)
        stored = time.monotonic() - t0
        lost = report_ended_runs(instance, store, None)
        assert not lost.events and lost.already_reported == n
        later = time.time() + 3600  # an hour on: every run ended before the lookback window
        steady_cold = report_ended_runs(instance, DirectoryStore(d), first.cursor, now=later)
        steady = report_ended_runs(instance, store, lost.cursor, now=later)
        print(f"objects: {n}")
        print(
            f"first tick (no cursor, all new):       {first.seconds:6.2f} s, "
            f"{len(first.events)} events"
        )
        print(f"storing those events (daemon's share): {stored:6.2f} s")
        print(f"tick with no cursor, all reported:     {lost.seconds:6.2f} s")
        print(f"steady tick, new process (cold cache): {steady_cold.seconds:6.2f} s")
        print(f"steady tick, same process:             {steady.seconds:6.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
