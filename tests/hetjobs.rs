//! Heterogeneous jobs (issue 14) against the real Slurm test cluster: `spec.components`
//! become one `sbatch` submission queued once; the payload runs in component 0 and reaches
//! the others through `srun --het-group=N` and `components.json`; status has each
//! component's job ID, nodes and metrics, and the totals over all of them.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

/// Runs a command on component 1 through the `srun` that `components.json` gives it: a busy
/// loop of at least 2 s (bash's `SECONDS` steps in whole seconds of the wall clock).
const PAYLOAD: &str = r#"import json, os, subprocess
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as p:
    comps = json.load(open(os.environ["SAO_COMPONENTS_FILE"]))
    other = comps["components"][1]
    out = subprocess.run(
        other["srun"] + ["bash", "-c", "echo $SLURMD_NODENAME $SLURM_CPUS_ON_NODE; while [ $SECONDS -lt 3 ]; do :; done"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    p.report_asset_materialization(metadata={
        "component1_host": out[0], "component1_cpus": int(out[1]),
        "component1_nodes": ",".join(other["nodes"]), "component1_job": other["jobId"],
        "names": ",".join(c["name"] for c in comps["components"]),
        "here": os.environ.get("SLURMD_NODENAME", ""),
    })
"#;

#[test]
fn one_payload_reaches_its_second_component_through_srun_het_group() {
    let (dir, _c) = slurm_dir("hetjob-single");
    let d = dir.path();
    write(d, "payload.py", PAYLOAD);
    write(
        d,
        "het.yaml",
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {name: het}\nspec:\n  assetKey: het/single\n  clusterRef: hpc\n  resources: {mem: 100M, timeLimit: \"00:05:00\"}\n  components:\n    - name: driver\n      resources: {cpusPerTask: 1}\n    - name: workers\n      resources: {cpusPerTask: 2, mem: 300M}\n  payload: {path: payload.py}\n",
    );
    let _op = Operator::start_logged(d, None);
    let done = wait_object(d, "het", "the end", Duration::from_secs(120), terminal);
    let s = &done["status"];
    assert_eq!(phase(&done), "Succeeded", "{s:#}");
    let job = s["jobId"].as_str().unwrap().to_string();
    assert_eq!(metadata(&done, "names"), "driver,workers");
    assert_eq!(metadata(&done, "component1_job"), format!("{job}+1"));
    assert_eq!(metadata(&done, "component1_cpus"), 2, "{s:#}");
    let host = metadata(&done, "component1_host");
    assert_eq!(host, metadata(&done, "component1_nodes"), "{s:#}");
    // Status: each component's job ID and nodes; metrics per component and in total.
    let metered = wait_object(d, "het", "metrics", Duration::from_secs(60), |o| {
        o["status"]["components"][1]["metrics"]["allocCpus"].is_number()
    });
    // One submission: the tag names one job, of two components.
    let uid = done["metadata"]["uid"].as_str().unwrap();
    let rows = sacct_jobs(&format!("sao.{uid}."));
    let ids: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(ids, [format!("{job}+0"), format!("{job}+1")], "{rows:?}");
    let comps = metered["status"]["components"].as_array().unwrap();
    assert_eq!(comps.len(), 2, "{comps:#?}");
    for (i, name) in ["driver", "workers"].iter().enumerate() {
        assert_eq!(comps[i]["name"], *name);
        assert_eq!(comps[i]["jobId"], format!("{job}+{i}"));
        assert_eq!(comps[i]["slurmState"], "COMPLETED", "{comps:#?}");
        assert_eq!(comps[i]["nodes"].as_array().unwrap().len(), 1, "{comps:#?}");
    }
    assert_eq!(comps[1]["nodes"][0], host);
    assert_eq!(comps[0]["metrics"]["allocCpus"], 1, "{comps:#?}");
    assert_eq!(comps[1]["metrics"]["allocCpus"], 2, "{comps:#?}");
    // The busy loop ran on component 1: its CPU time is its own.
    assert!(
        comps[1]["metrics"]["totalCpuSeconds"].as_f64().unwrap() > 1.0,
        "{comps:#?}"
    );
    let m = &metered["status"]["metrics"];
    assert_eq!(m["allocCpus"], 3, "the totals over both: {m:#}");
    assert_eq!(m["allocNodes"], 2, "{m:#}");
    let elapsed = m["elapsedSeconds"].as_f64().unwrap();
    assert!(
        (m["nodeHours"].as_f64().unwrap() - elapsed * 2.0 / 3600.0).abs() < 1e-6,
        "{m:#}"
    );
}

/// A Ray task placed by its component's custom resource.
const RAY_PAYLOAD: &str = r#"import json, os
import ray
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as p:
    ray.init(address="auto")
    comps = json.load(open(os.environ["SAO_COMPONENTS_FILE"]))
    @ray.remote(resources={"wide": 1})
    def where():
        return os.environ.get("SLURMD_NODENAME", "")
    placed = sorted(set(ray.get([where.remote() for _ in range(4)])))
    res = ray.cluster_resources()
    p.report_asset_materialization(metadata={
        "placed": ",".join(placed), "wide_nodes": ",".join(comps["components"][1]["nodes"]),
        "alive": len([n for n in ray.nodes() if n["Alive"]]),
        "narrow": res.get("narrow", 0), "wide": res.get("wide", 0),
    })
"#;

#[test]
fn a_ray_cluster_spans_the_components_and_places_a_task_by_component() {
    let (dir, c) = slurm_dir("hetjob-ray");
    let d = dir.path();
    write(d, "payload.py", RAY_PAYLOAD);
    write(
        d,
        "rayhet.yaml",
        &format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: rayhet}}\nspec:\n  assetKey: het/ray\n  clusterRef: hpc\n  launcher: {{type: ray, ray: {{objectStoreMemory: 100M}}}}\n  resources: {{mem: 900M, timeLimit: \"00:10:00\"}}\n  environment: {{preDeployedEnvPath: {}}}\n  components:\n    - name: narrow\n      resources: {{cpusPerTask: 1}}\n    - name: wide\n      resources: {{cpusPerTask: 2}}\n  payload: {{path: payload.py}}\n",
            c.ray_env
        ),
    );
    let _op = Operator::start_logged(d, None);
    let done = wait_object(d, "rayhet", "the end", Duration::from_secs(240), terminal);
    let s = &done["status"];
    assert_eq!(phase(&done), "Succeeded", "{s:#}");
    assert_eq!(metadata(&done, "alive"), 2, "{s:#}");
    // Every task asking for the `wide` resource ran on component 1's node.
    assert_eq!(
        metadata(&done, "placed"),
        metadata(&done, "wide_nodes"),
        "{s:#}"
    );
    assert_eq!(metadata(&done, "wide"), 2.0, "as many as its CPUs");
    assert_eq!(metadata(&done, "narrow"), 1.0);
    assert_eq!(s["launcher"]["nodesJoined"], 2, "{s:#}");
    assert_nothing_left_under(&remote_base("hetjob-ray"));
}

/// One component's own payload: reports which component it is and where it ran; exits
/// with `HET_EXIT` if that names it.
const COMPONENT_PAYLOAD: &str = r#"import os, sys
from dagster_pipes import open_dagster_pipes
me = sys.argv[1]
with open_dagster_pipes() as p:
    print("component", me, flush=True)
    if os.environ.get("HET_EXIT_" + me):
        sys.exit(int(os.environ["HET_EXIT_" + me]))
    p.report_asset_materialization(metadata={
        "component": me, "node": os.environ.get("SLURMD_NODENAME", ""),
        "job": os.environ.get("SLURM_JOB_ID", ""),
    })
"#;

fn three_components(name: &str, extra: &str) -> String {
    let comp = |n: &str, res: &str| {
        format!(
            "    - name: {n}\n      assetKey: pipeline/{n}\n      resources: {res}\n      payload: {{path: comp.py, args: [{n}]}}\n"
        )
    };
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n  assetKey: pipeline/all\n  clusterRef: hpc\n  resources: {{timeLimit: \"00:05:00\"}}\n{extra}  components:\n{}{}{}",
        comp("prep", "{cpusPerTask: 1, mem: 100M}"),
        comp("train", "{cpusPerTask: 2, mem: 300M}"),
        comp("infer", "{cpusPerTask: 1, mem: 200M}"),
    )
}

#[test]
fn three_payloads_run_side_by_side_as_one_heterogeneous_job() {
    let (dir, _c) = slurm_dir("hetjob-three");
    let d = dir.path();
    write(d, "comp.py", COMPONENT_PAYLOAD);
    write(d, "three.yaml", &three_components("three", ""));
    write(
        d,
        "broken.yaml",
        &three_components("broken", "  env: [{name: HET_EXIT_infer, value: \"3\"}]\n"),
    );
    let _op = Operator::start_logged(d, None);
    let done = wait_object(d, "three", "the end", Duration::from_secs(120), terminal);
    let s = &done["status"];
    assert_eq!(phase(&done), "Succeeded", "{s:#}");
    let job = s["jobId"].as_str().unwrap().to_string();
    let comps = s["components"].as_array().unwrap();
    assert_eq!(comps.len(), 3, "{s:#}");
    for (i, name) in ["prep", "train", "infer"].iter().enumerate() {
        let c = &comps[i];
        assert_eq!(c["name"], *name);
        assert_eq!(c["jobId"], format!("{job}+{i}"));
        assert_eq!(c["exitCode"], 0, "{c:#}");
        assert_eq!(
            c["logTail"]["stdout"],
            format!("component {name}\n"),
            "{c:#}"
        );
        // Its own Pipes channel: its materialization, under its own key.
        let m = &c["pipes"]["materializations"][0];
        assert_eq!(m["metadata"]["component"]["raw_value"], *name, "{c:#}");
        assert_eq!(m["assetKey"], format!("pipeline/{name}"), "{c:#}");
        assert_eq!(m["metadata"]["job"]["raw_value"], job.as_str());
    }
    // One submission of three components.
    let metered = wait_object(d, "three", "metrics", Duration::from_secs(60), |o| {
        o["status"]["components"][2]["metrics"]["allocCpus"].is_number()
    });
    let uid = metered["metadata"]["uid"].as_str().unwrap();
    let ids: Vec<String> = sacct_jobs(&format!("sao.{uid}."))
        .into_iter()
        .map(|r| r.2)
        .collect();
    assert_eq!(
        ids,
        [0, 1, 2].map(|i| format!("{job}+{i}")),
        "one job, three components"
    );
    let cpus: Vec<&Value> = (0..3)
        .map(|i| &metered["status"]["components"][i]["metrics"]["allocCpus"])
        .collect();
    assert_eq!(cpus, [1, 2, 1].map(Value::from).iter().collect::<Vec<_>>());
    assert_eq!(metered["status"]["metrics"]["allocCpus"], 4);
    for i in 0..3 {
        let c = &metered["status"]["components"][i];
        assert_eq!(
            c["nodes"][0], c["pipes"]["materializations"][0]["metadata"]["node"]["raw_value"],
            "each payload ran on its component's node: {c:#}"
        );
    }
    // One failing component fails the asset and names itself.
    let broken = wait_object(d, "broken", "the end", Duration::from_secs(120), terminal);
    let b = &broken["status"];
    assert_eq!(phase(&broken), "Failed", "{b:#}");
    assert_eq!(b["exitCode"], 3, "{b:#}");
    assert_eq!(b["components"][2]["exitCode"], 3, "{b:#}");
    assert_eq!(b["components"][0]["exitCode"], 0, "{b:#}");
    assert!(
        b["message"]
            .as_str()
            .is_some_and(|m| m.contains("component infer") && m.contains("exit code 3")),
        "{b:#}"
    );
}
