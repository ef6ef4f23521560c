# Shared settings of the test-cluster scripts (sourced).
STATE=${SAO_TEST_CLUSTER_STATE:-/var/lib/sao-test-cluster}   # keys, known_hosts, logs, pid files
SSH_PORT=${SAO_TEST_SSH_PORT:-2222}
SSH_LISTEN=${SAO_TEST_SSH_LISTEN:-127.0.0.1}   # 0.0.0.0 inside the dev container
TEST_USER=saotest
TEST_PASSWORD=saotest-password
TEST_HOME=/home/$TEST_USER
PIPES_ENV=$TEST_HOME/envs/pipes          # pre-deployed environment with dagster-pipes
RAY_ENV=$TEST_HOME/envs/ray              # the same with Ray
SPARK_ENV=$TEST_HOME/envs/spark          # the same with PySpark (Java is Debian's)
NODES="n1 n2 n3"
OTP_SSH_PORT=${SAO_TEST_OTP_SSH_PORT:-2223}   # a second sshd: password + TOTP code (PAM)
KEY_OTP_SSH_PORT=${SAO_TEST_KEY_OTP_SSH_PORT:-2224}   # a third: key + TOTP code
PACKAGES="slurm-wlm slurmdbd munge mariadb-server openssh-server python3-venv libpam-google-authenticator openjdk-17-jre-headless"

# The Slurm daemons this test cluster started: the PIDs in its own pid files. Anything else
# by those names belongs to somebody else (a real Slurm on a login node or workstation).
own_pids() {
  local f
  for f in "$STATE"/slurmctld.pid "$STATE"/slurmdbd.pid "$STATE"/slurmd-*.pid; do
    [ -f "$f" ] && tr -dc '0-9\n' < "$f" && echo
  done
}
# Prints "NAME PID" of each running Slurm daemon that is not this test cluster's.
foreign_slurm_daemons() {
  local own name pid
  own=" $(own_pids | tr '\n' ' ') "
  for name in slurmctld slurmd slurmdbd; do
    for pid in $(pgrep -x "$name" 2>/dev/null); do
      case "$own" in *" $pid "*) ;; *) echo "$name $pid" ;; esac
    done
  done
}
