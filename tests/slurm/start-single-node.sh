#!/usr/bin/env bash
# Install (if missing) and start a real single-node SLURM on this machine, for
# tests/test_slurm.py: Debian 12, run as root, no systemd. Idempotent: when `sinfo`
# already shows the node idle it does nothing. Two fake GPUs (character devices) are
# configured so that `--gpus=1` jobs schedule. Stop it with tests/slurm/stop-single-node.sh.
set -euo pipefail
if sinfo -h -o %t 2>/dev/null | grep -qx idle; then echo "slurm: already up"; exit 0; fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
mkdir -p /run/munge /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /dev/fakegpu
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
chown slurm:slurm /run/slurm /var/spool/slurmctld /var/log/slurm 2>/dev/null || true
for i in 0 1; do [ -e /dev/fakegpu/nvidia$i ] || mknod /dev/fakegpu/nvidia$i c 1 3; done
node=$(slurmd -C | head -1 | sed 's/ *$//')
mem=$(echo "$node" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
node=$(echo "$node" | sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/")
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mrpf-ci
SlurmctldHost=$host
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
GresTypes=gpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
$node Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
Name=gpu File=/dev/fakegpu/nvidia[0-1]
CONF
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qx idle; then echo "slurm: node $host idle"; exit 0; fi
  sleep 1
done
echo "slurm: node did not become idle; sinfo says: $(sinfo -h -o '%t %E' 2>&1)" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
