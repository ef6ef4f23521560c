#!/usr/bin/env python3
"""Speed benchmark of the operator against the Slurm test cluster (issue 11).

Measures, against floors taken in the same run over one reused SSH connection:

1. sequential: one SlurmAsset at a time, manifest written -> status `Succeeded`;
2. floor A: `sbatch --wait` of an equivalent job, one at a time;
3. floor B: one ssh command per job: `sbatch --parsable`, then `squeue -h -j ID` every 0.1 s;
4. concurrent: N manifests written at once -> all `Succeeded`, against a bulk floor (one ssh
   command submitting N jobs and polling `squeue` until none is left);
5. scheduler RPCs per asset (`sdiag`, `sacctmgr show stats` deltas, read locally as root);
6. the operator's SSH connections (`.status/operator-metrics.yaml`);
7. the operator's peak RSS and CPU time (/proc);
8. a scale case: 10,000 completed assets on the implicit local cluster: settle time of a start,
   RSS, CPU per manifest change, idle CPU.

The operator runs with default settings (no pollInterval), started on a directory holding only
the SlurmCluster manifest and warm (cluster Reachable) before anything is timed.

Needs: the test cluster (`tests/cluster/up`, env file /var/lib/sao-test-cluster/env), root (for
sdiag/sacctmgr and /proc of the operator), Python 3 standard library only.

Usage: SAO_BIN=target/release/slurm-asset-operator python3 bench/slurm_speed.py [--quick] ...
(scripts/bench-slurm builds the release binary and runs this).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER_ENV = Path("/var/lib/sao-test-cluster/env")
API = "dagster-slurm.io/v1alpha1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STATUS_POLL = 0.02  # seconds between status-file reads
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
PHASE_RE = re.compile(r"^  phase: (\S+)\s*$", re.MULTILINE)

# The trivial Python payload: one Pipes materialization.
PAYLOAD = """\
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"n": 1})
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --- statistics and formatting ---------------------------------------------------------


@dataclass
class Figure:
    """Samples of one measured quantity."""

    values: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, digits: int = 2) -> str:
        if not self.values:
            return "n/a"
        lo, hi = min(self.values), max(self.values)
        if len(self.values) == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio(a: Figure, b: Figure) -> str:
    if not a.ok or not b.ok or b.median <= 0:
        return "n/a"
    return f"x{a.median / b.median:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


# --- the test cluster, over one reused SSH connection ----------------------------------


@dataclass
class Cluster:
    host: str
    port: str
    user: str
    key: str
    known_hosts: str
    env_path: str
    deploy_base: str

    @staticmethod
    def from_env_file(path: Path = CLUSTER_ENV) -> Cluster:
        if not path.exists():
            raise BenchError(
                f"{path} missing: start the test cluster with tests/cluster/up"
            )
        env = dict(
            line.split("=", 1) for line in path.read_text().splitlines() if "=" in line
        )
        return Cluster(
            host=env["SLURM_EDGE_NODE_HOST"],
            port=env["SLURM_EDGE_NODE_PORT"],
            user=env["SLURM_EDGE_NODE_USER"],
            key=env["SLURM_EDGE_NODE_KEY_PATH"],
            known_hosts=env["SLURM_EDGE_NODE_KNOWN_HOSTS"],
            env_path=env["CI_DEPLOYED_ENVIRONMENT_PATH"],
            deploy_base=env["SLURM_DEPLOYMENT_BASE_PATH"],
        )

    def ssh_argv(self) -> list[str]:
        return [
            "ssh",
            "-i",
            self.key,
            "-p",
            self.port,
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ControlMaster=auto",
            "-o",
            "ControlPath=/tmp/bench-cm-%C",
            "-o",
            "ControlPersist=60",
            f"{self.user}@{self.host}",
        ]

    def run(self, script: str, timeout: float = 600, stdin: str | None = None) -> str:
        """Runs a shell script on the edge node; raises on a non-zero exit."""
        p = subprocess.run(
            [*self.ssh_argv(), script],
            check=False,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if p.returncode != 0:
            raise BenchError(
                f"ssh {script[:120]!r}: exit {p.returncode}: {p.stderr.strip()}"
            )
        return p.stdout

    def warm(self) -> None:
        """Opens (or keeps alive) the shared master connection before anything is timed."""
        self.run("true", timeout=30)

    def close(self) -> None:
        subprocess.run(
            [*self.ssh_argv()[:-1], "-O", "exit", self.ssh_argv()[-1]],
            check=False,
            capture_output=True,
            timeout=30,
        )

    def manifest(self, name: str, remote_base: str) -> str:
        """The SlurmCluster manifest, as the Dagster integration tests write it, minus
        pollInterval: the defaults are what is measured."""
        return (
            f"apiVersion: {API}\nkind: SlurmCluster\nmetadata: {{name: {name}}}\nspec:\n"
            f"  mode: slurm\n  remoteBase: {json.dumps(remote_base)}\n"
            f"  ssh: {{host: {self.host}, port: {self.port}, user: {self.user}, "
            f"keyPath: {self.key}, knownHosts: {{path: {self.known_hosts}}}}}\n"
            f"  environment: {{preDeployedEnvPath: {self.env_path}}}\n"
        )


# --- scheduler RPC counters (read locally: we are root on the cluster host) ------------


RPC_LINE = re.compile(r"^\s+(\S+)\s+\(\s*\d+\)\s+count:(\d+)", re.MULTILINE)


def parse_rpc_sections(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """(count by message type, count by user) from sdiag / sacctmgr show stats output."""
    by_type: dict[str, int] = {}
    by_user: dict[str, int] = {}
    section: dict[str, int] | None = None
    for line in text.splitlines():
        if "statistics by message type" in line:
            section = by_type
        elif "statistics by user" in line:
            section = by_user
        elif section is not None:
            m = RPC_LINE.match(line)
            if m:
                section[m.group(1)] = section.get(m.group(1), 0) + int(m.group(2))
            elif line.strip() and not line.startswith("\t"):
                section = None
    return by_type, by_user


@dataclass
class RpcSnapshot:
    ctld_types: dict[str, int]
    ctld_users: dict[str, int]
    dbd_types: dict[str, int]
    dbd_users: dict[str, int]

    @staticmethod
    def take() -> RpcSnapshot:
        sd = subprocess.run(
            ["sdiag"], check=False, capture_output=True, text=True, timeout=60
        ).stdout
        db = subprocess.run(
            ["sacctmgr", "-n", "show", "stats"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        ct, cu = parse_rpc_sections(sd)
        dt, du = parse_rpc_sections(db)
        return RpcSnapshot(ct, cu, dt, du)


@dataclass
class RpcDelta:
    ctld_user: float
    ctld_all: float
    dbd_user: float
    dbd_all: float


@dataclass
class Background:
    """RPCs of the cluster user while this benchmark does nothing: other users of the test
    cluster (e.g. a test suite) inflate the (user) columns by about this rate."""

    seconds: float
    ctld_per_s: float | None
    dbd_per_s: float | None


def measure_background(meter: RpcMeter, seconds: float) -> Background:
    a = RpcSnapshot.take()
    time.sleep(seconds)
    d = meter.delta(a, RpcSnapshot.take())
    if d is None:
        return Background(seconds, None, None)
    return Background(seconds, d.ctld_user / seconds, d.dbd_user / seconds)


class RpcMeter:
    """Before/after RPC counts; `all` is corrected by the counters' own cost (measured once:
    sdiag and sacctmgr are RPCs themselves)."""

    def __init__(self, user: str) -> None:
        self.user = user
        a = RpcSnapshot.take()
        b = RpcSnapshot.take()
        self.overhead_ctld = sum(b.ctld_types.values()) - sum(a.ctld_types.values())
        self.overhead_dbd = sum(b.dbd_types.values()) - sum(a.dbd_types.values())
        self.foreign_jobs: list[int] = []

    def before(self) -> RpcSnapshot:
        """The snapshot before a timed repeat; also notes how many jobs are already in the
        queue (0 expected: others mean a shared cluster and noisy figures)."""
        q = subprocess.run(
            ["squeue", "-h", "-a", "-o", "%i"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.foreign_jobs.append(len(q.stdout.split()))
        return RpcSnapshot.take()

    def delta(self, a: RpcSnapshot, b: RpcSnapshot) -> RpcDelta | None:
        """None when a counter went down (statistics were reset in between)."""

        def d(x: dict[str, int], y: dict[str, int], keys: Iterable[str]) -> int | None:
            diff = {k: y.get(k, 0) - x.get(k, 0) for k in keys}
            down = {k: v for k, v in diff.items() if v < 0}
            if down:
                log(f"RPC counters went down (statistics reset?): {down}")
                return None
            return sum(diff.values())

        ct = d(a.ctld_types, b.ctld_types, set(a.ctld_types) | set(b.ctld_types))
        dt = d(a.dbd_types, b.dbd_types, set(a.dbd_types) | set(b.dbd_types))
        cu = d(a.ctld_users, b.ctld_users, [self.user])
        du = d(a.dbd_users, b.dbd_users, [self.user])
        if None in (ct, dt, cu, du):
            return None
        assert ct is not None and dt is not None and cu is not None and du is not None
        return RpcDelta(cu, ct - self.overhead_ctld, du, dt - self.overhead_dbd)


@dataclass
class RpcFigures:
    """Per-asset RPC counts, one sample per repeat."""

    ctld_user: Figure = field(default_factory=Figure)
    ctld_all: Figure = field(default_factory=Figure)
    dbd_user: Figure = field(default_factory=Figure)
    dbd_all: Figure = field(default_factory=Figure)

    def add(self, d: RpcDelta | None, assets: int) -> None:
        if d is None:
            return
        self.ctld_user.values.append(d.ctld_user / assets)
        self.ctld_all.values.append(d.ctld_all / assets)
        self.dbd_user.values.append(d.dbd_user / assets)
        self.dbd_all.values.append(d.dbd_all / assets)


# --- the operator as a child process ---------------------------------------------------


@dataclass
class ProcStats:
    cpu_ticks: int  # utime + stime
    child_ticks: int  # cutime + cstime (reaped children: ssh clients, local jobs)
    vm_hwm_kib: int
    vm_rss_kib: int


def proc_stats(pid: int) -> ProcStats:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    status = Path(f"/proc/{pid}/status").read_text()

    def kib(key: str) -> int:
        m = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
        return int(m.group(1)) if m else 0

    return ProcStats(utime + stime, cutime + cstime, kib("VmHWM"), kib("VmRSS"))


class Operator:
    """`SAO_BIN standalone --dir DIR`, long-running; stopped with SIGTERM."""

    def __init__(self, binary: str, directory: Path, logfile: Path) -> None:
        self.dir = directory
        self.logfile = logfile
        self._log = logfile.open("ab")
        self.proc = subprocess.Popen(
            [binary, "standalone", "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"the operator exited ({self.proc.returncode}):\n{self.log_tail()}"
            )

    def stats(self) -> ProcStats:
        self.alive()
        return proc_stats(self.pid)

    def metrics(self) -> dict[str, int]:
        return read_flat_yaml_ints(self.dir / ".status" / "operator-metrics.yaml")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, n: int = 3000) -> str:
        return self.logfile.read_text(errors="replace")[-n:]


def read_flat_yaml_ints(path: Path) -> dict[str, int]:
    """`key: 123` lines of a flat YAML mapping."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+): (\d+)\s*$", text, re.MULTILINE)
    }


# --- manifests and status files --------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Hidden temp file + rename: the operator never sees a half-written manifest (it skips
    hidden files)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.rename(tmp, path)


def status_path(directory: Path, name: str, kind: str = "SlurmAsset") -> Path:
    return directory / ".status" / "default" / kind / f"{name}.yaml"


def phase(path: Path) -> str | None:
    try:
        m = PHASE_RE.search(path.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def slurm_asset_manifest(name: str) -> str:
    inline = "".join(f"      {line}\n" for line in PAYLOAD.splitlines())
    return (
        f"apiVersion: {API}\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n"
        f"  assetKey: bench/{name}\n  clusterRef: hpc\n"
        f"  payload:\n    interpreter: [python]\n    inline: |\n{inline}"
    )


def wait_terminal(
    directory: Path, names: list[str], timeout: float
) -> dict[str, float]:
    """Polls the status files every 20 ms until every asset is terminal; returns the
    monotonic time each one was first seen Succeeded. Raises on Failed/Cancelled/timeout.
    A file is re-read only when its mtime or size changed (cheap with hundreds pending)."""
    pending = {n: status_path(directory, n) for n in names}
    seen: dict[str, tuple[int, int]] = {}
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while pending:
        now = time.monotonic()
        for n, p in list(pending.items()):
            try:
                st = p.stat()
            except OSError:
                continue
            if seen.get(n) == (st.st_mtime_ns, st.st_size):
                continue
            seen[n] = (st.st_mtime_ns, st.st_size)
            ph = phase(p)
            if ph in TERMINAL:
                if ph != "Succeeded":
                    raise BenchError(f"{n} ended {ph}:\n{p.read_text()[-3000:]}")
                done[n] = now
                del pending[n]
        if not pending:
            break
        if now > deadline:
            some = next(iter(pending))
            raise BenchError(
                f"timed out: {len(pending)} of {len(names)} assets not terminal, e.g. {some}: "
                f"phase {phase(pending[some])}"
            )
        time.sleep(STATUS_POLL)
    return done


def check_materialized(directory: Path, names: list[str]) -> int:
    """How many of the assets' status files lack the Pipes materialization."""
    missing = 0
    for n in names:
        text = status_path(directory, n).read_text()
        if f"assetKey: bench/{n}" not in text or "materializations:" not in text:
            missing += 1
    return missing


# --- the floors: the same payload as a plain Slurm job, over the shared connection -----


def pipes_env(data: dict[str, object]) -> str:
    return base64.b64encode(zlib.compress(json.dumps(data).encode())).decode()


class Floors:
    """Uploads one job script per floor scenario (each with its own Pipes messages file, to
    check that every job really reported its materialization)."""

    def __init__(self, cluster: Cluster, remote_dir: str, tag: str) -> None:
        self.c = cluster
        self.dir = remote_dir
        self.job_name = f"sao-bench-floor-{tag}"
        self.payload = f"{remote_dir}/payload.py"
        self.c.run(
            f"mkdir -p {shlex.quote(remote_dir)}/out && cat > {shlex.quote(self.payload)}",
            stdin=PAYLOAD,
        )

    def prepare(self, scenario: str) -> str:
        """Writes the job script of `scenario`; returns its remote path."""
        context = {
            "asset_keys": ["bench/floor"],
            "code_version_by_asset_key": None,
            "provenance_by_asset_key": None,
            "partition_key": None,
            "partition_key_range": None,
            "partition_time_window": None,
            "run_id": f"floor-{scenario}",
            "job_name": None,
            "retry_number": 0,
            "extras": {},
        }
        messages = {"path": f"{self.dir}/messages-{scenario}.jsonl"}
        script = (
            "#!/bin/bash\n"
            f"export DAGSTER_PIPES_CONTEXT={pipes_env({'data': context})}\n"
            f"export DAGSTER_PIPES_MESSAGES={pipes_env(messages)}\n"
            f". {shlex.quote(self.c.env_path)}/bin/activate\n"
            f"python {shlex.quote(self.payload)} < /dev/null\n"
        )
        path = f"{self.dir}/job-{scenario}.sh"
        self.c.run(f"cat > {shlex.quote(path)}", stdin=script)
        return path

    def sbatch(self, script: str) -> str:
        out = shlex.quote(f"{self.dir}/out/%j.out")
        return f"sbatch --parsable -J {self.job_name} -o {out} {shlex.quote(script)}"

    def materializations(self, scenario: str) -> int:
        f = shlex.quote(f"{self.dir}/messages-{scenario}.jsonl")
        return int(
            self.c.run(f"grep -c report_asset_materialization {f} || true").strip() or 0
        )

    def cancel_all(self) -> None:
        try:
            self.c.run(f"scancel -n {self.job_name}", timeout=30)
        except (BenchError, subprocess.TimeoutExpired):
            pass


# --- scenarios -------------------------------------------------------------------------


@dataclass
class SeqResult:
    label: str
    times: Figure
    rpc: RpcFigures
    assets: int


@dataclass
class ConcResult:
    label: str
    n: int
    wall: Figure
    rpc: RpcFigures


@dataclass
class OperatorSnapshot:
    scenario: str
    metrics: dict[str, int]
    stats: ProcStats
    cpu_delta_s: float
    assets: int


def run_floor_sequential(
    floors: Floors,
    meter: RpcMeter,
    label: str,
    scenario: str,
    cmd: Callable[[str], str],
    n: int,
    repeats: int,
) -> SeqResult:
    """N jobs one after another, `repeats` times; one ssh command per job."""
    script = floors.prepare(scenario)
    res = SeqResult(label, Figure(), RpcFigures(), n * repeats)
    for r in range(repeats):
        floors.c.warm()
        before = meter.before()
        for _ in range(n):
            t0 = time.monotonic()
            floors.c.run(cmd(script), timeout=600)
            res.times.values.append(time.monotonic() - t0)
        res.rpc.add(meter.delta(before, RpcSnapshot.take()), n)
        log(
            f"{label}: repeat {r + 1}/{repeats}: median {statistics.median(res.times.values):.2f} s"
        )
    got = floors.materializations(scenario)
    if got != n * repeats:
        raise BenchError(
            f"{label}: {got} of {n * repeats} jobs reported a materialization"
        )
    return res


def floor_a(floors: Floors, meter: RpcMeter, n: int, repeats: int) -> SeqResult:
    return run_floor_sequential(
        floors,
        meter,
        "floor A: ssh sbatch --wait",
        "A",
        lambda s: (
            floors.sbatch(s).replace("sbatch ", "sbatch --wait ", 1) + " >/dev/null"
        ),
        n,
        repeats,
    )


def floor_b(floors: Floors, meter: RpcMeter, n: int, repeats: int) -> SeqResult:
    def cmd(script: str) -> str:
        return (
            f"id=$({floors.sbatch(script)}) || exit 1; "
            'while [ -n "$(squeue -h -j "$id" 2>/dev/null)" ]; do sleep 0.1; done'
        )

    return run_floor_sequential(
        floors, meter, "floor B: sbatch + squeue 0.1 s", "B", cmd, n, repeats
    )


def floor_bulk(floors: Floors, meter: RpcMeter, n: int, repeats: int) -> ConcResult:
    """One ssh command: submit N jobs in a loop, then poll squeue until none is left."""
    scenario = f"bulk{n}"
    script = floors.prepare(scenario)
    res = ConcResult(
        f"floor: bulk sbatch + squeue 0.2 s (N={n})", n, Figure(), RpcFigures()
    )
    cmd = (
        f"for i in $(seq {n}); do {floors.sbatch(script)} >/dev/null || exit 1; done; "
        f'while [ -n "$(squeue -h -n {floors.job_name} 2>/dev/null)" ]; do sleep 0.2; done'
    )
    for r in range(repeats):
        floors.c.warm()
        before = meter.before()
        t0 = time.monotonic()
        floors.c.run(cmd, timeout=600 + 10 * n)
        res.wall.values.append(time.monotonic() - t0)
        res.rpc.add(meter.delta(before, RpcSnapshot.take()), n)
        log(f"bulk floor N={n}: repeat {r + 1}/{repeats}: {res.wall.values[-1]:.2f} s")
    got = floors.materializations(scenario)
    if got != n * repeats:
        raise BenchError(f"bulk floor N={n}: {got} of {n * repeats} jobs materialized")
    return res


def start_slurm_operator(
    binary: str, work: Path, cluster: Cluster, remote_base: str
) -> Operator:
    """Starts the operator on a directory holding only the SlurmCluster manifest and waits
    until the cluster is Reachable, so that start-up cost is excluded."""
    d = work / "slurm"
    d.mkdir()
    write_atomic(d / "cluster.yaml", cluster.manifest("hpc", remote_base))
    op = Operator(binary, d, work / "operator-slurm.log")
    path = status_path(d, "hpc", "SlurmCluster")
    deadline = time.monotonic() + 120
    while True:
        op.alive()
        try:
            text = path.read_text()
        except OSError:
            text = ""
        m = re.search(r"reason: (\w+)\n\s+status: \"(\w+)\"\n\s+type: Reachable", text)
        if m and m.group(2) == "True":
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"cluster status not Reachable after 120 s:\n{text}\n{op.log_tail()}"
            )
        time.sleep(0.05)
    log(
        f"operator pid {op.pid} warm: cluster Reachable after {time.monotonic() - op.started:.2f} s"
    )
    return op


def operator_snapshot(
    op: Operator, scenario: str, cpu_before: int, assets: int
) -> OperatorSnapshot:
    time.sleep(0.3)  # let the operator write its metrics file after the last transition
    st = op.stats()
    return OperatorSnapshot(
        scenario, op.metrics(), st, (st.cpu_ticks - cpu_before) / CLK_TCK, assets
    )


def operator_sequential(
    op: Operator, meter: RpcMeter, n: int, repeats: int
) -> tuple[SeqResult, OperatorSnapshot]:
    res = SeqResult("operator: sequential", Figure(), RpcFigures(), n * repeats)
    cpu0 = op.stats().cpu_ticks
    names_all: list[str] = []
    for r in range(repeats):
        before = meter.before()
        for i in range(n):
            name = f"seq-r{r + 1}-{i:03d}"
            t0 = time.monotonic()
            write_atomic(op.dir / f"{name}.yaml", slurm_asset_manifest(name))
            done = wait_terminal(op.dir, [name], timeout=600)
            res.times.values.append(done[name] - t0)
            names_all.append(name)
        res.rpc.add(meter.delta(before, RpcSnapshot.take()), n)
        log(
            f"operator sequential: repeat {r + 1}/{repeats}: "
            f"median {statistics.median(res.times.values):.2f} s"
        )
    missing = check_materialized(op.dir, names_all)
    if missing:
        log(
            f"WARNING: {missing} sequential assets lack their Pipes materialization in status"
        )
    return res, operator_snapshot(op, "sequential", cpu0, n * repeats)


def operator_concurrent(
    op: Operator, meter: RpcMeter, n: int, repeats: int
) -> tuple[ConcResult, OperatorSnapshot]:
    res = ConcResult(f"operator: concurrent (N={n})", n, Figure(), RpcFigures())
    cpu0 = op.stats().cpu_ticks
    names_all: list[str] = []
    for r in range(repeats):
        names = [f"conc{n}-r{r + 1}-{i:04d}" for i in range(n)]
        texts = [slurm_asset_manifest(nm) for nm in names]
        before = meter.before()
        t0 = time.monotonic()
        for nm, text in zip(names, texts, strict=True):
            write_atomic(op.dir / f"{nm}.yaml", text)
        done = wait_terminal(op.dir, names, timeout=600 + 10 * n)
        res.wall.values.append(max(done.values()) - t0)
        res.rpc.add(meter.delta(before, RpcSnapshot.take()), n)
        names_all += names
        log(
            f"operator concurrent N={n}: repeat {r + 1}/{repeats}: {res.wall.values[-1]:.2f} s"
        )
    missing = check_materialized(op.dir, names_all)
    if missing:
        log(
            f"WARNING: {missing} concurrent assets lack their Pipes materialization in status"
        )
    return res, operator_snapshot(op, f"concurrent N={n}", cpu0, n * repeats)


# --- sessions: N small assets as steps of one allocation, versus N jobs ----------------


SESSION_CPUS = 6  # the test cluster's three nodes of two CPUs


def session_manifest(name: str) -> str:
    return (
        f"apiVersion: {API}\nkind: SlurmSession\nmetadata: {{name: {name}}}\nspec:\n"
        f"  clusterRef: hpc\n  resources: {{nodes: 3, ntasks: {SESSION_CPUS}, "
        f'timeLimit: "00:30:00"}}\n  maxConcurrentSteps: {SESSION_CPUS}\n  idleTimeout: 30s\n'
    )


def operator_session(
    op: Operator, meter: RpcMeter, n: int, repeats: int
) -> list[tuple[ConcResult, ConcResult]]:
    """N small assets written at once: as N jobs; as steps of one SlurmSession written with
    them (cold: its allocation's queueing and start count); and N more in the same session
    once it runs (warm, as the later assets of a Dagster run see it)."""
    jobs = ConcResult(f"operator: N separate jobs (N={n})", n, Figure(), RpcFigures())
    sess = ConcResult(f"operator: one new session (N={n})", n, Figure(), RpcFigures())
    warm = ConcResult(f"operator: a running session (N={n})", n, Figure(), RpcFigures())

    def batch(
        result: ConcResult,
        names: list[str],
        manifest: Callable[[str], str],
        first: str = "",
    ) -> None:
        """Writes `first` (a session), then the N manifests, and times them to their end."""
        before = meter.before()
        t0 = time.monotonic()
        if first:
            write_atomic(op.dir / f"{first}.yaml", session_manifest(first))
        for nm in names:
            write_atomic(op.dir / f"{nm}.yaml", manifest(nm))
        done = wait_terminal(op.dir, names, timeout=600 + 10 * n)
        result.wall.values.append(max(done.values()) - t0)
        result.rpc.add(meter.delta(before, RpcSnapshot.take()), n)

    for r in range(repeats):
        sname = f"bench-session-{n}-r{r + 1}"

        def in_session(nm: str, sname: str = sname) -> str:
            return slurm_asset_manifest(nm).replace(
                "  clusterRef: hpc\n", f"  clusterRef: hpc\n  sessionRef: {sname}\n"
            )

        batch(
            jobs,
            [f"sepjob{n}-r{r + 1}-{i:04d}" for i in range(n)],
            slurm_asset_manifest,
        )
        batch(
            sess,
            [f"insession{n}-r{r + 1}-{i:04d}" for i in range(n)],
            in_session,
            sname,
        )
        batch(warm, [f"warmsession{n}-r{r + 1}-{i:04d}" for i in range(n)], in_session)
        # The session ends (its allocation is cancelled) before the next repeat.
        (op.dir / f"{sname}.yaml").unlink()
        spath = status_path(op.dir, sname, "SlurmSession")
        deadline = time.monotonic() + 120
        while "phase: Ended" not in (spath.read_text() if spath.exists() else ""):
            if time.monotonic() > deadline:
                raise BenchError(
                    f"session {sname} did not end:\n{spath.read_text()[-2000:]}"
                )
            time.sleep(0.2)
        log(
            f"sessions N={n}: repeat {r + 1}/{repeats}: jobs {jobs.wall.values[-1]:.2f} s, "
            f"new session {sess.wall.values[-1]:.2f} s, running session {warm.wall.values[-1]:.2f} s"
        )
    return [(jobs, sess), (jobs, warm)]


# --- scale: many completed assets on the implicit local cluster ------------------------


SCALE_PER_FILE = 1  # assets per manifest file: one file per asset, as users write them
LABEL_KEY = "sao-bench-rev"


def spec_hash(spec: dict[str, object]) -> str:
    """The operator's spec hash: sha256 of the key-sorted compact JSON, 16 hex digits."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scale_name(i: int) -> str:
    return f"s{i:05d}"


def scale_doc(i: int, rev: int | None = None) -> str:
    n = scale_name(i)
    labels = f', labels: {{{LABEL_KEY}: "{rev}"}}' if rev is not None else ""
    return (
        f"apiVersion: {API}\nkind: SlurmAsset\nmetadata: {{name: {n}{labels}}}\n"
        f'spec: {{assetKey: bench/scale/{n}, payload: {{inline: "true"}}}}\n'
    )


def scale_file(d: Path, f: int) -> Path:
    return d / f"m{f:03d}.yaml"


def write_scale_manifests(d: Path, count: int) -> None:
    for f in range((count + SCALE_PER_FILE - 1) // SCALE_PER_FILE):
        idx = range(f * SCALE_PER_FILE, min(count, (f + 1) * SCALE_PER_FILE))
        scale_file(d, f).write_text("---\n".join(scale_doc(i) for i in idx))


def run_once(binary: str, d: Path, logfile: Path, timeout: float) -> float | None:
    """`standalone --once` over `d`; its wall time, or None when it ran out of time."""
    t0 = time.monotonic()
    with logfile.open("ab") as lf:
        p = subprocess.Popen(
            [binary, "standalone", "--dir", str(d), "--once"],
            stdout=subprocess.DEVNULL,
            stderr=lf,
        )
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            return None
    if rc != 0:
        raise BenchError(f"--once over {d} exited {rc}; see {logfile}")
    return time.monotonic() - t0


def yaml_scalar(text: str) -> str:
    """A hex hash as the operator's YAML writer puts it: quoted when it would read as a
    number (e.g. `71973074494570e9` is a float), else plain."""
    number = re.fullmatch(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?", text)
    return f'"{text}"' if number else text


def synthesize_status(binary: str, work: Path, d: Path, count: int) -> None:
    """Status files for `count` completed assets, rendered from a real one: a seed asset is
    run first, its file is the template (name, uid, source, spec hash replaced)."""
    seed = work / "scale-seed"
    seed.mkdir()
    scale_file(seed, 0).write_text("---\n".join(scale_doc(i) for i in range(2)))
    if run_once(binary, seed, work / "operator-scale-seed.log", 120) is None:
        raise BenchError("the seed run did not finish")
    template = status_path(seed, scale_name(0)).read_text()
    for i in range(2):
        want = spec_hash(
            {"assetKey": f"bench/scale/{scale_name(i)}", "payload": {"inline": "true"}}
        )
        line = f"spec-hash: {yaml_scalar(want)}\n"
        if line not in status_path(seed, scale_name(i)).read_text():
            raise BenchError(
                "the operator's spec hash differs from this script's: cannot synthesize"
            )
    uid = re.search(r"^  uid: (\S+)$", template, re.MULTILINE)
    if uid is None:
        raise BenchError(f"no uid in the seed status:\n{template}")
    out = d / ".status" / "default" / "SlurmAsset"
    out.mkdir(parents=True, exist_ok=True)
    seed_src, seed_dir = str(scale_file(seed, 0)), str(seed)
    hash_line = re.compile(r"^(    dagster-slurm\.io/spec-hash: ).*$", re.MULTILINE)
    for i in range(count):
        n = scale_name(i)
        h = spec_hash({"assetKey": f"bench/scale/{n}", "payload": {"inline": "true"}})
        text = (
            template.replace(seed_src, str(scale_file(d, i // SCALE_PER_FILE)))
            .replace(seed_dir, str(d))
            .replace(scale_name(0), n)
            .replace(uid.group(1), str(uuid.uuid4()))
        )
        text = hash_line.sub(lambda m, h=h: m.group(1) + yaml_scalar(h), text)
        (out / f"{n}.yaml").write_text(text)


def wait_settled(
    op: Operator, timeout: float, window: float = 2.0, busy_ticks: int = 10
) -> float:
    """Seconds from the operator's start until its CPU stops increasing: the start of the first
    `window` in which it used at most `busy_ticks` clock ticks."""
    samples: list[tuple[float, int]] = []
    deadline = op.started + timeout
    while time.monotonic() < deadline:
        now, ticks = time.monotonic(), op.stats().cpu_ticks
        samples.append((now, ticks))
        old = [(t, c) for t, c in samples if now - t >= window]
        if old:
            last_t, last_c = old[-1]
            if ticks - last_c <= busy_ticks:
                return last_t - op.started
        time.sleep(0.1)
    raise BenchError(f"the operator did not settle within {timeout:.0f} s")


@dataclass
class ScaleResult:
    count: int
    fill: str
    first_settle_s: float
    restart_settle_s: float
    rss_mib: float
    hwm_mib: float
    idle_cpu_ms_per_s: float
    change_cpu_ms: Figure
    change_cpu_mean_ms: float
    change_latency_s: Figure
    changes: int
    unseen_changes: int
    resubmitted: int
    rewritten_first: int
    rewritten_restart: int


def files_changed_since(directory: Path, since: float) -> int:
    """How many files under `directory` were modified after `since` (epoch seconds)."""
    return sum(1 for p in directory.glob("*.yaml") if p.stat().st_mtime > since)


def measure_scale(
    binary: str,
    work: Path,
    count: int,
    changes: int,
    idle_s: float,
    once_timeout: float,
) -> ScaleResult:
    d = work / "scale"
    d.mkdir()
    write_scale_manifests(d, count)
    log(
        f"scale: {count} manifests written; completing them with --once "
        f"(limit {once_timeout:.0f} s)"
    )
    took = run_once(binary, d, work / "operator-scale-once.log", once_timeout)
    if took is not None:
        fill = f"real runs: `--once` over {count} assets took {took:.1f} s"
    else:
        log("scale: --once too slow; synthesizing the status files instead")
        for sub in (".status", ".runs"):
            shutil.rmtree(d / sub, ignore_errors=True)
        synthesize_status(binary, work, d, count)
        fill = (
            f"synthesized status files (`--once` over {count} took more than "
            f"{once_timeout:.0f} s)"
        )
    log(f"scale: {fill}")
    logfile = work / "operator-scale.log"

    status_dir = d / ".status" / "default" / "SlurmAsset"
    since = time.time()
    op = Operator(binary, d, logfile)
    try:
        first = wait_settled(op, timeout=1800)
    finally:
        op.stop()
    rewritten_first = files_changed_since(status_dir, since)
    log(f"scale: first start settled after {first:.2f} s")

    since = time.time()
    op = Operator(binary, d, logfile)
    try:
        settle = wait_settled(op, timeout=1800)
        rewritten_restart = files_changed_since(status_dir, since)
        st = op.stats()
        log(
            f"scale: restart settled after {settle:.2f} s, VmRSS {st.vm_rss_kib / 1024:.1f} MiB"
        )

        c0, t0 = op.stats().cpu_ticks, time.monotonic()
        time.sleep(idle_s)
        c1, t1 = op.stats().cpu_ticks, time.monotonic()
        idle_rate = (c1 - c0) / CLK_TCK / (t1 - t0)  # CPU seconds per second
        log(f"scale: idle CPU {idle_rate * 1000:.1f} ms/s")

        per_change, latencies = Figure(), Figure()
        unseen = 0
        path0 = status_path(d, scale_name(0))
        start_c, start_t = op.stats().cpu_ticks, time.monotonic()
        for k in range(1, changes + 1):
            wc, wt = op.stats().cpu_ticks, time.monotonic()
            docs = [scale_doc(0, rev=k)] + [
                scale_doc(i) for i in range(1, min(count, SCALE_PER_FILE))
            ]
            write_atomic(scale_file(d, 0), "---\n".join(docs))
            want = f'{LABEL_KEY}: "{k}"'
            seen = None
            while time.monotonic() - wt < 1.0:
                if seen is None:
                    try:
                        if want in path0.read_text():
                            seen = time.monotonic() - wt
                    except OSError:
                        pass
                time.sleep(STATUS_POLL)
            if seen is None:
                unseen += 1
            else:
                latencies.values.append(seen)
            ec, et = op.stats().cpu_ticks, time.monotonic()
            per_change.values.append(
                ((ec - wc) / CLK_TCK - idle_rate * (et - wt)) * 1000
            )
        # Let the last change finish, then account the whole series.
        want = f'{LABEL_KEY}: "{changes}"'
        deadline = time.monotonic() + 300
        while want not in path0.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_settled_after(op, 2.0, 10)
        end_c, end_t = op.stats().cpu_ticks, time.monotonic()
        mean = (
            ((end_c - start_c) / CLK_TCK - idle_rate * (end_t - start_t))
            / changes
            * 1000
        )
        resubmitted = sum(
            1
            for p in status_dir.glob("*.yaml")
            if phase(p) != "Succeeded" or "\n  run: 1\n" not in p.read_text()
        )
    finally:
        op.stop()
    return ScaleResult(
        count,
        fill,
        first,
        settle,
        st.vm_rss_kib / 1024,
        st.vm_hwm_kib / 1024,
        idle_rate * 1000,
        per_change,
        mean,
        latencies,
        changes,
        unseen,
        resubmitted,
        rewritten_first,
        rewritten_restart,
    )


def wait_settled_after(
    op: Operator, window: float, busy_ticks: int, timeout: float = 600
) -> None:
    """Waits until the operator used at most `busy_ticks` over `window` seconds."""
    deadline = time.monotonic() + timeout
    prev = op.stats().cpu_ticks
    while time.monotonic() < deadline:
        time.sleep(window)
        cur = op.stats().cpu_ticks
        if cur - prev <= busy_ticks:
            return
        prev = cur


# --- report ----------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = re.search(
        r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE
    )
    mem_gib = int(mem.group(1)) / 1024 / 1024 if mem else 0.0
    slurm = subprocess.run(
        ["sinfo", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), {mem_gib:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, {slurm}"
    )


def rpc_cells(rpc: RpcFigures, ref: RpcFigures | None) -> list[str]:
    def cell(f: Figure, r: Figure | None) -> str:
        s = f.fmt(1)
        return s if r is None or r is f else f"{s} {ratio(f, r)}"

    return [
        cell(rpc.ctld_user, ref.ctld_user if ref else None),
        rpc.ctld_all.fmt(1),
        cell(rpc.dbd_user, ref.dbd_user if ref else None),
        rpc.dbd_all.fmt(1),
    ]


RPC_HEAD = ["ctld RPC/asset (user)", "ctld (all)", "dbd RPC/asset (user)", "dbd (all)"]


def background_line(bg: Background | None, user: str) -> str:
    if bg is None:
        return "background RPCs: not measured"
    if bg.ctld_per_s is None or bg.dbd_per_s is None:
        return "background RPCs: unknown (scheduler statistics were reset meanwhile)"
    return (
        f"background RPCs of {user!r} while idle ({bg.seconds:.0f} s, before the floors): "
        f"ctld {bg.ctld_per_s:.2f}/s, dbd {bg.dbd_per_s:.2f}/s (anything but 0 means "
        "someone else uses the cluster as this user: the (user) columns are inflated)"
    )


def report(
    args: argparse.Namespace,
    seq: list[SeqResult],
    conc: list[tuple[ConcResult, ConcResult]],
    ops: list[OperatorSnapshot],
    scale: ScaleResult | None,
    user: str,
    background: Background | None,
    foreign_jobs: list[int],
    sessions: list[tuple[ConcResult, ConcResult]] | None = None,
) -> str:
    out = [machine(), f"operator: {args.bin}", ""]
    if seq:
        none = SeqResult("", Figure(), RpcFigures(), 0)
        a = next((s for s in seq if s.label.startswith("floor A")), none)
        b = next((s for s in seq if s.label.startswith("floor B")), none)
        rows = []
        for s in seq:
            rows.append(
                [
                    s.label,
                    str(s.assets),
                    s.times.fmt(),
                    ratio(s.times, a.times),
                    ratio(s.times, b.times),
                    *rpc_cells(s.rpc, b.rpc),
                ]
            )
        out += [
            (
                "Sequential, per asset: seconds from submit (manifest written) to done; "
                f"median (min-max) over {args.seq} assets x {args.repeats} repeats; "
                "RPC figures per repeat"
            ),
            table(["scenario", "n", "seconds", "vs A", "vs B", *RPC_HEAD], rows),
            "",
        ]

    def versus(o: ConcResult, base: ConcResult | None) -> list[str]:
        """A table row: `o`, and how it compares with `base` (none: it is the base)."""
        return [
            o.label,
            str(o.n),
            o.wall.fmt(),
            ratio(o.wall, base.wall) if base else "x1.00",
            *rpc_cells(o.rpc, base.rpc if base else None),
        ]

    if conc:
        rows = []
        for floor, o in conc:
            rows += [versus(floor, None), versus(o, floor)]
        out += [
            (
                "Concurrent: wall seconds until all N succeeded; "
                f"median (min-max) over {args.repeats} repeats"
            ),
            table(["scenario", "N", "wall s", "vs floor", *RPC_HEAD], rows),
            "",
        ]
    if sessions:
        rows = []
        for i, (jobs, sess) in enumerate(sessions):
            if i == 0:
                rows.append(versus(jobs, None))
            rows.append(versus(sess, jobs))
        out += [
            (
                "Sessions: N small assets written at once, as N jobs or as steps of one "
                f"SlurmSession ({SESSION_CPUS} steps at once); wall seconds until all succeeded, "
                f"median (min-max) over {args.repeats} repeats"
            ),
            table(["scenario", "N", "wall s", "vs jobs", *RPC_HEAD], rows),
            "",
        ]
    if seq or conc:
        out += [
            (
                "RPC columns: slurmctld (sdiag) and slurmdbd (sacctmgr show stats) RPC "
                f"count deltas per asset; (user) = RPCs of the cluster user {user!r}, "
                "(all) = every RPC incl. the daemons' own (job start/complete records), "
                "minus the counters' own queries; ratios against floor B (sequential) or "
                "the bulk floor (concurrent)."
            ),
            background_line(background, user),
            (
                "jobs already in the queue before a timed repeat (0 expected): max "
                f"{max(foreign_jobs, default=0)} over {len(foreign_jobs)} repeats"
            ),
            "",
        ]
    if ops:
        rows = []
        for o in ops:
            m = o.metrics
            rows.append(
                [
                    o.scenario,
                    str(m.get("sshConnects", "?")),
                    str(m.get("sshReconnects", "?")),
                    str(m.get("schedulerPolls", "?")),
                    str(m.get("remoteCommands", "?")),
                    f"{o.stats.vm_hwm_kib / 1024:.1f}",
                    f"{o.stats.vm_rss_kib / 1024:.1f}",
                    f"{o.cpu_delta_s:.2f}",
                    f"{o.cpu_delta_s / max(o.assets, 1) * 1000:.1f}",
                    f"{o.stats.cpu_ticks / CLK_TCK:.2f}",
                    f"{o.stats.child_ticks / CLK_TCK:.2f}",
                ]
            )
        out += [
            (
                "Operator (one warm process; operator-metrics.yaml counters and /proc, "
                "cumulative unless marked per scenario)"
            ),
            table(
                [
                    "after scenario",
                    "sshConnects",
                    "sshReconnects",
                    "schedulerPolls",
                    "remoteCommands",
                    "VmHWM MiB",
                    "VmRSS MiB",
                    "CPU s (scenario)",
                    "CPU ms/asset",
                    "CPU s total",
                    "children CPU s",
                ],
                rows,
            ),
            "",
        ]
    if scale:
        s = scale
        rows = [
            [
                "completed assets",
                f"{s.count} (local cluster, {SCALE_PER_FILE} per manifest file)",
            ],
            ["status files", s.fill],
            ["first start: settle s", f"{s.first_settle_s:.2f}"],
            ["restart: settle s", f"{s.restart_settle_s:.2f}"],
            ["restart: VmRSS / VmHWM MiB", f"{s.rss_mib:.1f} / {s.hwm_mib:.1f}"],
            [
                "idle CPU ms per s",
                f"{s.idle_cpu_ms_per_s:.1f} ({s.idle_cpu_ms_per_s / 10:.2f}% of a core)",
            ],
            [
                f"CPU ms per change ({s.changes} label edits, 1 s apart, idle subtracted)",
                f"{s.change_cpu_ms.fmt(1)}; mean over the series {s.change_cpu_mean_ms:.1f}",
            ],
            [
                "change → status file updated, s",
                f"{s.change_latency_s.fmt(3)}"
                + (f"; {s.unseen_changes} not within 1 s" if s.unseen_changes else ""),
            ],
            [
                "status files rewritten: first start / restart",
                f"{s.rewritten_first} / {s.rewritten_restart}",
            ],
            ["assets not Succeeded in run 1 afterwards", str(s.resubmitted)],
        ]
        out += ["Scale", table(["figure", "value"], rows), ""]
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument(
        "--bin",
        default=os.environ.get("SAO_BIN"),
        help="operator binary (default: $SAO_BIN)",
    )
    p.add_argument(
        "--seq", type=int, default=10, help="sequential assets per repeat (0: skip)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="repeats of every timed scenario"
    )
    p.add_argument(
        "--concurrent",
        default="50,200",
        help="comma-separated N for concurrent runs ('' skips)",
    )
    p.add_argument(
        "--scale",
        type=int,
        default=10000,
        help="completed assets of the scale case (0: skip)",
    )
    p.add_argument(
        "--scale-changes", type=int, default=20, help="manifest edits in the scale case"
    )
    p.add_argument(
        "--scale-idle", type=float, default=10.0, help="seconds of idle CPU measurement"
    )
    p.add_argument(
        "--scale-once-timeout",
        type=float,
        default=600.0,
        help="longest real `--once` fill of the scale case before status files are synthesized",
    )
    p.add_argument(
        "--session",
        type=int,
        default=30,
        help="small assets of the session comparison (0: skip)",
    )
    p.add_argument(
        "--no-floors", action="store_true", help="skip the floors (ratios become n/a)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: --seq 2 --repeats 1 --concurrent 5 --session 4 --scale 200, 5 changes, 5 s idle",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the local work directory (logs, manifests) and the remote one",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.repeats, args.concurrent, args.scale = 2, 1, "5", 200
        args.session = 4
        args.scale_changes, args.scale_idle, args.scale_once_timeout = 5, 5.0, 120.0
    if not args.bin:
        p.error("no operator binary: set SAO_BIN or pass --bin")
    args.bin = str(Path(args.bin).resolve())
    args.conc_ns = [int(x) for x in args.concurrent.split(",") if x.strip()]
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    if os.geteuid() != 0:
        log("WARNING: not root: sdiag/sacctmgr figures may be incomplete")
    work = Path(tempfile.mkdtemp(prefix="sao-bench-"))
    tag = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    seq: list[SeqResult] = []
    conc: list[tuple[ConcResult, ConcResult]] = []
    sessions: list[tuple[ConcResult, ConcResult]] = []
    ops: list[OperatorSnapshot] = []
    scale: ScaleResult | None = None
    cluster: Cluster | None = None
    floors: Floors | None = None
    background: Background | None = None
    meter: RpcMeter | None = None
    op: Operator | None = None
    remote = ""
    ok = False
    try:
        slurm = args.seq > 0 or args.conc_ns or args.session > 0
        if slurm:
            cluster = Cluster.from_env_file()
            remote = f"{cluster.deploy_base}/bench-{tag}"
            cluster.warm()
            meter = RpcMeter(cluster.user)
            background = measure_background(meter, 3.0 if args.quick else 10.0)
            log(
                f"background RPCs of {cluster.user}: ctld {background.ctld_per_s} /s, "
                f"dbd {background.dbd_per_s} /s"
            )
            floor_bulk_results: dict[int, ConcResult] = {}
            if not args.no_floors:
                # Floors first, with no operator running: its RPCs must not count.
                floors = Floors(cluster, f"{remote}/floor", tag)
                if args.seq > 0:
                    seq.append(floor_a(floors, meter, args.seq, args.repeats))
                    seq.append(floor_b(floors, meter, args.seq, args.repeats))
                for n in args.conc_ns:
                    floor_bulk_results[n] = floor_bulk(floors, meter, n, args.repeats)
            op = start_slurm_operator(args.bin, work, cluster, f"{remote}/operator")
            if args.seq > 0:
                r, snap = operator_sequential(op, meter, args.seq, args.repeats)
                seq.append(r)
                ops.append(snap)
            for n in args.conc_ns:
                r2, snap = operator_concurrent(op, meter, n, args.repeats)
                empty = ConcResult(
                    f"floor: bulk (skipped, N={n})", n, Figure(), RpcFigures()
                )
                conc.append((floor_bulk_results.get(n, empty), r2))
                ops.append(snap)
            if args.session > 0:
                sessions += operator_session(op, meter, args.session, args.repeats)
            op.stop()
            op = None
        if args.scale > 0:
            scale = measure_scale(
                args.bin,
                work,
                args.scale,
                args.scale_changes,
                args.scale_idle,
                args.scale_once_timeout,
            )
        ok = True
    except (BenchError, subprocess.TimeoutExpired) as e:
        log(f"FAILED: {e}")
        if op is not None:
            log(f"operator log tail:\n{op.log_tail()}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        if op is not None:
            op.stop()
        if floors is not None and not ok:
            floors.cancel_all()
        if cluster is not None:
            if remote and not args.keep:
                try:
                    cluster.run(f"rm -rf {shlex.quote(remote)}", timeout=120)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    log(f"remote cleanup failed: {e}")
            cluster.close()
        if args.keep or not ok:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    user = cluster.user if cluster else "?"
    foreign = meter.foreign_jobs if meter else []
    print(report(args, seq, conc, ops, scale, user, background, foreign, sessions))
    print(f"total benchmark time: {time.monotonic() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
