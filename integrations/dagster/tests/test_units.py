"""Pure helpers: names, label values, selectors, and the streaming of output lines."""

import re

import pytest

from dagster_slurm_asset import label_value, object_name
from dagster_slurm_asset.client import hetjob_spec, new_output
from dagster_slurm_asset.spec import SlurmJob, SlurmResources
from dagster_slurm_asset.store import matches_selector


def test_object_names_are_deterministic_valid_and_distinct() -> None:
    a = object_name("analytics/train_model", "2026-11-01", "run-1")
    assert a == object_name("analytics/train_model", "2026-11-01", "run-1")
    others = {
        object_name("analytics/train_model", "2026-11-02", "run-1"),
        object_name("analytics/train_model", "2026-11-01", "run-2"),
        object_name("analytics/train/model", "2026-11-01", "run-1"),
        object_name("analytics/train_model", None, "run-1"),
    }
    assert a not in others and len(others) == 4
    for key in ["x" * 300, "Ünïcode/../$(rm -rf)", "", "/"]:
        name = object_name(key, None, "r")
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and len(name) <= 63, name


def test_label_values() -> None:
    assert label_value("2026-11-01") == "2026-11-01"
    v = label_value("analytics/train model")
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?", v) and len(v) <= 63
    assert label_value("a/b") != label_value("a.b")
    assert len(label_value("y" * 200)) <= 63


def test_selectors() -> None:
    labels = {"a": "1", "b": "2"}
    assert matches_selector(labels, "a=1,b")
    assert matches_selector(labels, "a==1,!c")
    assert not matches_selector(labels, "a!=1")
    assert not matches_selector(labels, "!a")
    assert not matches_selector(labels, "c")
    assert matches_selector(labels, None)


def test_new_output_streams_complete_lines_once() -> None:
    # The stream so far: "one\ntw" (6 bytes); only the complete line goes while running.
    lines, upto, skipped = new_output("one\ntw", 6, 0, final=False)
    assert (lines, upto, skipped) == (["one"], 4, 0)
    # Later: "one\ntwo\nthree\n" (14 bytes).
    lines, upto, _ = new_output("one\ntwo\nthree\n", 14, upto, final=False)
    assert (lines, upto) == (["two", "three"], 14)
    assert new_output("one\ntwo\nthree\n", 14, upto, final=False)[0] == []
    # A tail that no longer reaches back to what was passed on: the gap is counted.
    lines, upto, skipped = new_output("x\ny\n", 100, 14, final=False)
    assert (lines, upto, skipped) == (["x", "y"], 100, 82)
    # At the end, the unfinished last line goes too.
    assert new_output("last", 104, 100, final=True)[0] == ["last"]


def test_slurm_job_spec() -> None:
    spec = SlurmJob(
        command=["python", "-m", "train"],
        resources=SlurmResources(
            time_limit="01:00:00", gpus_per_node=1, extra_sbatch_args=["--exclusive"]
        ),
        env={"A": "1"},
        cluster="hpc",
    ).to_spec()
    assert spec == {
        "payload": {"command": ["python", "-m", "train"]},
        "clusterRef": "hpc",
        "resources": {
            "timeLimit": "01:00:00",
            "gpusPerNode": 1,
            "extraSbatchArgs": ["--exclusive"],
        },
        "env": [{"name": "A", "value": "1"}],
    }
    with pytest.raises(ValueError):
        SlurmJob(inline="x", command=["y"]).to_spec()


def test_each_hetjob_component_keeps_its_own_launcher() -> None:
    spec = hetjob_spec(
        {
            "etl": ("p/etl", SlurmJob(command=["etl"], launcher={"type": "spark"}, env={"A": "1"})),
            "fit": ("p/fit", SlurmJob(command=["fit"], env={"B": "2"})),
        }
    )
    etl, fit = spec["components"]
    assert etl["launcher"] == {"type": "spark"}
    assert "launcher" not in fit
    assert [e["name"] for e in spec["env"]] == ["A", "B"]
    with pytest.raises(ValueError):
        hetjob_spec({"one": ("p/one", SlurmJob(command=["x"]))})
