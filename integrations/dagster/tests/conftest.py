"""Fixtures: the real operator binary (standalone or Kubernetes mode), the real Slurm test
cluster (`tests/cluster/up`) and the real Kubernetes API server (`KUBECONFIG`)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
CLUSTER_ENV = Path("/var/lib/sao-test-cluster/env")
PAYLOADS = Path(__file__).parent / "payloads"


def operator_bin() -> Path:
    p = Path(os.environ.get("SAO_BIN", REPO / "target/debug/slurm-asset-operator"))
    if not p.exists():
        pytest.fail(f"operator binary {p} missing: run `cargo build` first (or set SAO_BIN)")
    return p


@dataclass
class TestCluster:
    host: str
    port: str
    user: str
    key: str
    known_hosts: str
    env_path: str
    deploy_base: str

    def slurm_manifest(self, name: str, remote_base: str) -> str:
        return (
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\n"
            f"metadata: {{name: {name}}}\nspec:\n  mode: slurm\n  pollInterval: 1s\n"
            f"  remoteBase: {json.dumps(remote_base)}\n"
            f"  ssh: {{host: {self.host}, port: {self.port}, user: {self.user}, "
            f"keyPath: {self.key}, knownHosts: {{path: {self.known_hosts}}}}}\n"
            f"  environment: {{preDeployedEnvPath: {self.env_path}}}\n"
        )

    def local_manifest(self, name: str) -> str:
        # Local mode runs the same job script on this host, with the same pre-deployed
        # environment (a venv holding dagster-pipes).
        return (
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\n"
            f"metadata: {{name: {name}}}\nspec:\n  mode: local\n  pollInterval: 200ms\n"
            f"  environment: {{preDeployedEnvPath: {self.env_path}}}\n"
        )


@pytest.fixture(scope="session")
def test_cluster() -> TestCluster:
    if not CLUSTER_ENV.exists():
        pytest.fail("the Slurm test cluster is not up: run tests/cluster/up (as root)")
    env = dict(line.split("=", 1) for line in CLUSTER_ENV.read_text().splitlines() if "=" in line)
    return TestCluster(
        host=env["SLURM_EDGE_NODE_HOST"],
        port=env["SLURM_EDGE_NODE_PORT"],
        user=env["SLURM_EDGE_NODE_USER"],
        key=env["SLURM_EDGE_NODE_KEY_PATH"],
        known_hosts=env["SLURM_EDGE_NODE_KNOWN_HOSTS"],
        env_path=env["CI_DEPLOYED_ENVIRONMENT_PATH"],
        deploy_base=env["SLURM_DEPLOYMENT_BASE_PATH"],
    )


class Operator:
    """The operator binary as a child process; stopped (SIGTERM) at teardown."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._f = log.open("wb")
        env = {**os.environ, "RUST_LOG": "info"}
        self.proc = subprocess.Popen(
            [str(operator_bin()), *args], stdout=subprocess.DEVNULL, stderr=self._f, env=env
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def standalone(
    tmp_path: Path, test_cluster: TestCluster
) -> Iterator[Callable[[], tuple[Path, Operator]]]:
    """A standalone operator on a fresh directory holding the clusters `laptop` (local) and
    `hpc` (the real Slurm, with a remote base of its own)."""
    started: list[Operator] = []
    d = tmp_path / "assets"
    d.mkdir()
    base = f"{test_cluster.deploy_base}/pytest-{uuid.uuid4().hex[:10]}"
    (d / "clusters.yaml").write_text(
        test_cluster.local_manifest("laptop") + "---\n" + test_cluster.slurm_manifest("hpc", base)
    )

    def start() -> tuple[Path, Operator]:
        op = Operator(["standalone", "--dir", str(d)], tmp_path / "operator.log")
        started.append(op)
        return d, op

    yield start
    for op in started:
        op.stop()


# --- Slurm accounting ------------------------------------------------------------------


def sacct_jobs(uid: str) -> list[tuple[str, str, str]]:
    """(job name, state, job ID) of every job the operator submitted for object `uid`."""
    out = subprocess.run(
        ["sacct", "-a", "-X", "-P", "-n", "-S", "now-2hours", "--format=JobName%200,State,JobID"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [tuple(line.split("|")[:3]) for line in out.splitlines() if line.count("|") >= 2]
    return [r for r in rows if r[0].startswith(f"sao.{uid}.")]  # type: ignore[misc]


def wait_until(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --- Kubernetes ------------------------------------------------------------------------


def kubectl(*args: str, input: str | None = None) -> str:
    res = subprocess.run(
        ["kubectl", *args], capture_output=True, text=True, input=input, check=False
    )
    if res.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {res.stderr}")
    return res.stdout


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    kc = os.environ.get("KUBECONFIG")
    if not kc:
        pytest.fail("no Kubernetes API server: set KUBECONFIG (./scripts/test starts one)")
    if not shutil.which("kubectl"):
        pytest.fail("kubectl is not on PATH")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds/crds.yaml"))
    return kc


@pytest.fixture
def k8s_namespace(
    kubeconfig: str, tmp_path: Path, test_cluster: TestCluster
) -> Iterator[tuple[str, Operator]]:
    """A fresh namespace with the SlurmCluster `hpc` (key and known_hosts in a Secret) and
    the operator running in Kubernetes mode for it."""
    ns = f"pytest-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns)
    b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "slurm-ssh", "namespace": ns},
        "data": {
            "ssh-privatekey": b64(test_cluster.key),
            "known_hosts": b64(test_cluster.known_hosts),
        },
    }
    base = f"{test_cluster.deploy_base}/pytest-{ns}"
    cluster = {
        "apiVersion": "dagster-slurm.io/v1alpha1",
        "kind": "SlurmCluster",
        "metadata": {"name": "hpc", "namespace": ns},
        "spec": {
            "mode": "slurm",
            "pollInterval": "1s",
            "remoteBase": base,
            "environment": {"preDeployedEnvPath": test_cluster.env_path},
            "ssh": {
                "host": test_cluster.host,
                "port": int(test_cluster.port),
                "user": test_cluster.user,
                "keySecretRef": {"name": "slurm-ssh", "key": "ssh-privatekey"},
                "knownHosts": {"secretRef": {"name": "slurm-ssh", "key": "known_hosts"}},
            },
        },
    }
    kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, cluster]}),
    )
    work = tmp_path / "work"
    work.mkdir()
    op = Operator(
        [
            "run",
            f"--namespace={ns}",
            "--metrics-port=0",
            "--kubeconfig",
            kubeconfig,
            "--work-dir",
            str(work),
        ],
        tmp_path / "operator.log",
    )
    yield ns, op
    # Objects first, while the operator still runs to release their finalizers.
    subprocess.run(
        ["kubectl", "delete", "slurmassets", "--all", "-n", ns, "--wait=true", "--timeout=60s"],
        capture_output=True,
        check=False,
    )
    op.stop()
    subprocess.run(
        ["kubectl", "delete", "namespace", ns, "--wait=false"], capture_output=True, check=False
    )
