//! Leadership fencing against the real Slurm test cluster: two operator replicas (two SSH
//! masters) submitting the same attempt at once yield one job, and a deposed leader (a lower
//! epoch than one that already submitted for the asset) is refused before `sbatch`.

mod common;
use common::*;
use slurm_asset_operator::Error;
use slurm_asset_operator::api::{SlurmAssetSpec, SlurmClusterSpec};
use slurm_asset_operator::executor::slurm::{Counters, SlurmExecutor};
use slurm_asset_operator::jobscript::{PlanContext, RunId, RunPlan, plan};
use slurm_asset_operator::transport::{SshAuth, SshTarget};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn executor(c: &TestCluster) -> SlurmExecutor {
    let target = SshTarget {
        host: c.host.clone(),
        port: c.port.parse().unwrap(),
        user: c.user.clone(),
        auth: SshAuth::KeyFile(PathBuf::from(&c.key)),
        known_hosts: Some(PathBuf::from(&c.known_hosts)),
        jump_hosts: vec![],
        extra_options: vec![],
        connect_timeout: Duration::from_secs(10),
        totp_seed: None,
    };
    SlurmExecutor::new(target, BIN.into(), Arc::new(Counters::default()))
}

fn attempt(home: &str, base: &str, uid: &str, run: u64, epoch: u64) -> RunPlan {
    let spec: SlurmAssetSpec = serde_json::from_value(serde_json::json!({
        "assetKey": "t/fenced", "payload": {"inline": "sleep 3; echo done"}
    }))
    .unwrap();
    let cluster: SlurmClusterSpec =
        serde_json::from_value(serde_json::json!({"mode": "slurm", "remoteBase": base})).unwrap();
    let ctx = PlanContext {
        asset_dir: Path::new("/"),
        cluster: &cluster,
        cluster_dir: Path::new("/"),
        default_base: PathBuf::from("/unused"),
        remote_home: Some(home),
    };
    let id = RunId {
        namespace: "default".into(),
        name: "fenced".into(),
        uid: uid.into(),
        run,
        attempt: 1,
        epoch,
        session: false,
    };
    plan(&spec, id, &ctx).unwrap()
}

/// The jobs sacct knows under `tag`, waiting for accounting to record the submission.
async fn jobs_named(tag: &str, expect_some: bool) -> Vec<(String, String, String)> {
    for _ in 0..20 {
        let jobs: Vec<_> = sacct_jobs(tag).into_iter().filter(|j| j.0 == tag).collect();
        if !jobs.is_empty() || !expect_some {
            return jobs;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    vec![]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leaders_never_submit_one_run_twice_and_a_deposed_one_is_fenced() {
    let c = test_cluster();
    let (old_leader, new_leader) = (executor(&c), executor(&c));
    let home = new_leader.facts().await.unwrap().home;
    // Both masters up first, so that the two submissions really overlap.
    old_leader.facts().await.unwrap();
    let base = remote_base("fencing");
    let uid = format!("fence-{}", std::process::id());

    // Both replicas submit run 1 at the same moment: the per-asset lock makes one adopt the
    // other's job.
    let p1 = attempt(&home, &base, &uid, 1, 7);
    let (a, b) = tokio::join!(old_leader.submit(&p1), new_leader.submit(&p1));
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a.job_id, b.job_id, "one job for both: {a:?} {b:?}");
    assert_ne!(a.adopted, b.adopted, "exactly one submitted: {a:?} {b:?}");
    let jobs = jobs_named(&p1.id.tag(), true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(jobs_named(&p1.id.tag(), true).await.len(), 1, "{jobs:?}");

    // A new leader (epoch 8) submits run 2; the old one (epoch 7) then tries run 3 from its
    // stale view and is refused before sbatch.
    let p2 = attempt(&home, &base, &uid, 2, 8);
    let s2 = new_leader.submit(&p2).await.unwrap().unwrap();
    assert!(!s2.adopted);
    let p3 = attempt(&home, &base, &uid, 3, 7);
    match old_leader.submit(&p3).await {
        Err(Error::Fenced { epoch: 7, fence: 8 }) => {}
        other => panic!("a deposed leader must be fenced, got {other:?}"),
    }
    assert!(
        jobs_named(&p3.id.tag(), false).await.is_empty(),
        "the fenced submission reached Slurm"
    );
    // The same stale leader cannot even re-submit what the new one owns; the new one adopts.
    let p2_stale = attempt(&home, &base, &uid, 2, 7);
    assert!(matches!(
        old_leader.submit(&p2_stale).await,
        Err(Error::Fenced { .. })
    ));
    let again = new_leader.submit(&p2).await.unwrap().unwrap();
    assert!(again.adopted);
    assert_eq!(again.job_id, s2.job_id);
    // The sbatch comment carries the epoch.
    assert!(
        slurm_asset_operator::jobscript::sbatch_argv(&p2)
            .contains(&"--comment=default/fenced run 2 attempt 1 epoch 8".to_string())
    );
    for id in [&a.job_id, &s2.job_id] {
        let _ = std::process::Command::new("scancel").arg(id).status();
    }
}
