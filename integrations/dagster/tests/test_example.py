"""The example code location: it validates, and it runs against a standalone operator."""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
from conftest import Operator, wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_validates_and_runs(tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy)
    monkeypatch.setenv("SAO_DIR", str(copy / "assets"))
    dagster = Path(sys.executable).parent / "dagster"
    out = subprocess.run(
        [str(dagster), "definitions", "validate", "-f", str(copy / "definitions.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # The local cluster runs `python3` from PATH: this venv's, which has dagster-pipes.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    op = Operator(["standalone", "--dir", str(copy / "assets")], tmp_path / "operator.log")
    try:
        defs = runpy.run_path(str(copy / "definitions.py"))["defs"]
        instance = dg.DagsterInstance.ephemeral()
        job = defs.get_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=instance,
            partition_key="2026-11-05",
            asset_selection=[dg.AssetKey("daily_counts")],
        )
        assert result.success
        (m,) = result.asset_materializations_for_node("daily_counts")
        assert m.metadata["day"].value == "2026-11-05"
        assert m.metadata["slurm/phase"].value == "Succeeded"
        summary = dg.materialize([defs.get_assets_def("weekly_summary")], instance=instance)
        (s,) = summary.asset_materializations_for_node("weekly_summary")
        assert s.metadata["total_last_7"].value == m.metadata["count"].value
        # The asset applied outside Dagster: in the graph, and reported by the sensor.
        store = runpy.run_path(str(copy / "definitions.py"))["store"]
        wait_until(
            "nightly-report to succeed",
            lambda: (
                ((store.get("nightly-report") or {}).get("status") or {}).get("phase")
                == "Succeeded"
            ),
        )
        defs = runpy.run_path(str(copy / "definitions.py"))["defs"]
        spec = defs.resolve_asset_graph().get(dg.AssetKey(["reports", "nightly"]))
        assert spec is not None
        sensor = defs.get_sensor_def("slurm_asset_sensor")
        events = sensor(dg.build_sensor_context(instance=instance)).asset_events
        assert [e.asset_key.to_user_string() for e in events] == ["reports/nightly"]
        assert events[0].metadata["pages"].value == 12
    except BaseException:
        print(op.log_text())
        raise
    finally:
        op.stop()
