#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for tests/test_slurm.py (Debian's slurm-wlm 22.05 + munge), as root.
# cred_expire=10: a requeued job may start again after 10 s instead of the default 120 s.
#   tests/slurm/local_cluster.sh install   apt-get install slurm-wlm munge (CI does this), then start
#   tests/slurm/local_cluster.sh start     configure and start munged, slurmctld, slurmd (idempotent)
#   tests/slurm/local_cluster.sh stop
# It only ever talks to this machine. Where it cannot start, the SLURM test skips.
set -euo pipefail
cmd=${1:-start}
if [ "$cmd" = install ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  cmd=start
fi
if [ "$cmd" = stop ]; then
  pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
  for _ in $(seq 30); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || exit 0
    sleep 0.5
  done
  exit 0
fi
command -v slurmctld >/dev/null || { echo "slurm-wlm is not installed (tests/slurm/local_cluster.sh install)"; exit 1; }
host=$(hostname)
mem=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge 2>/dev/null || true
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/cgroup.conf <<CONF
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
CONF
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then sinfo; exit 0; fi
  sleep 1
done
echo "the local SLURM cluster did not come up"; sinfo || true
exit 1
