#!/usr/bin/env bash
# A two-node SLURM cluster on this machine for tests/test_slurm.py (Debian's slurm-wlm 22.05 + munge), as root: two
# slurmd daemons (`slurmd -N node1`, `-N node2`, each on its own port), so that `sbatch --nodes=2` starts one task per
# "node" exactly as on two hosts. The nodes' address is 127.0.0.1 (NodeAddr), which launch/slurm.sbatch reads.
# cred_expire=10: a requeued job may start again after 10 s instead of the default 120 s; sched_interval=2: the main
# scheduling loop, which is what starts it then (no event does), runs every 2 s instead of every 60 s.
#   tests/slurm/local_cluster.sh install   apt-get install slurm-wlm munge (CI does this), then start
#   tests/slurm/local_cluster.sh start     configure and start munged, slurmctld, 2 x slurmd (idempotent)
#   tests/slurm/local_cluster.sh stop      end the daemons that start started, and nothing else
# It only ever talks to this machine. Where it cannot start, the SLURM test skips.
#
# Each daemon it starts writes its pid file into $state (munged --pid-file, SlurmctldPidFile and SlurmdPidFile in
# slurm.conf); `stop` signals exactly those pids, never processes found by name, so it cannot end another user's
# daemons. $state is under /run, which a reboot empties: a pid file never outlives the boot whose pid it names.
set -euo pipefail
cmd=${1:-start}
state=${LOCAL_SLURM_STATE:-/run/smollm2-local-slurm}
conf=/etc/slurm/slurm.conf  # where sinfo/sbatch/scontrol look by default, so the tests need no SLURM_CONF
SLURMDS="slurmd-node1 slurmd-node2"  # one per "node"; pid files slurmd-node1.pid, ...

# pid_file NAME: where NAME's pid is written. munged runs as user munge, so it writes into a directory munge owns.
pid_file() {
  if [ "$1" = munged ]; then echo "$state/munge/munged.pid"; else echo "$state/$1.pid"; fi
}

# pid_of NAME: the pid in NAME's pid file while that process is still NAME (a pid reused by another program is not
# ours) and not a zombie (an exited daemon whose parent, e.g. a container's init, has not reaped it).
pid_of() {
  local pid
  pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 0
  if [[ $pid =~ ^[0-9]+$ ]] && awk -v name="${1%%-node*}" '/^Name:/ {n = $2} /^State:/ {s = $2} END {exit !(n == name && s != "Z")}' \
      "/proc/$pid/status" 2>/dev/null; then
    echo "$pid"
  fi
}

# stop_one NAME: SIGTERM our NAME, wait up to 10 s for it to exit, then SIGKILL; remove its pid file.
stop_one() {
  local name=$1 pid deadline
  pid=$(pid_of "$name")
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [ -n "$(pid_of "$name")" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if [ -n "$(pid_of "$name")" ]; then
      echo "$name (pid $pid) still running 10 s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 5))
      while [ -n "$(pid_of "$name")" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
      if [ -n "$(pid_of "$name")" ]; then echo "$name (pid $pid) survived SIGKILL" >&2; return 1; fi
    fi
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$(pid_file "$name")"
}

stop() {  # slurmd first, munged last: the SLURM daemons authenticate through munge while they shut down
  local failed=0
  for name in $SLURMDS slurmctld munged; do stop_one "$name" || failed=1; done
  return "$failed"
}

# wait_pid_file NAME: a daemon writes its pid file once it has forked into the background; fail if it never does.
wait_pid_file() {
  local deadline=$((SECONDS + 15))
  while [ -z "$(pid_of "$1")" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then echo "$1 did not start (no live pid in $(pid_file "$1"))" >&2; return 1; fi
    sleep 0.2
  done
}

start() {
  if ! command -v slurmctld >/dev/null; then echo "slurm-wlm is not installed (tests/slurm/local_cluster.sh install)"; return 1; fi
  local host mem
  host=$(hostname)
  mem=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
  mkdir -p "$state" /etc/slurm /var/spool/slurmctld /var/spool/slurmd-node1 /var/spool/slurmd-node2 /var/log/slurm /run/munge
  mkdir -p "$state/munge"  # munged runs as munge and writes its pid file itself
  chown munge:munge /run/munge "$state/munge" 2>/dev/null || true
  cat > "$conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
  cat > /etc/slurm/cgroup.conf <<CONF
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
CONF
  # munged: ours if we started it earlier; a munge that already answers (e.g. the package's service) is used as it is
  # and left alone by stop; otherwise start one.
  if [ -z "$(pid_of munged)" ] && ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file="$(pid_file munged)"
    wait_pid_file munged
  fi
  if [ -z "$(pid_of slurmctld)" ]; then slurmctld -f "$conf"; wait_pid_file slurmctld; fi
  for name in $SLURMDS; do
    if [ -z "$(pid_of "$name")" ]; then slurmd -f "$conf" -N "${name#slurmd-}"; wait_pid_file "$name"; fi
  done
  for _ in $(seq 30); do
    if [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cE '^(idle|mix|alloc)')" -ge 2 ]; then sinfo; return 0; fi
    sleep 1
  done
  echo "the local SLURM cluster did not come up"; sinfo || true
  return 1
}

# A start that fails halfway (a daemon that does not come up, a timeout's SIGTERM) ends the daemons it did start.
stop_if_failed() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then echo "start failed (exit $rc): stopping what it started"; stop || true; fi
}

case $cmd in
  install | start)
    trap stop_if_failed EXIT
    trap 'exit 143' TERM  # timeout(1) sends SIGTERM: exit through the EXIT trap instead of dying past it
    if [ "$cmd" = install ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    start  # called plainly, not in an `if`/`||`, so that set -e stops at its first failing command
    ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
