#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost for the SLURM tests: munged, slurmctld and slurmd from
# Debian's packages (slurm-wlm, munge), installed with apt-get when sbatch is missing.
#
#   tests/slurm/cluster.sh install # apt-get install slurm-wlm munge, when sbatch is missing
#   tests/slurm/cluster.sh start   # install if needed, write the config, start the daemons, wait for the node
#   tests/slurm/cluster.sh stop    # stop the daemons started here and remove the state folder
#   tests/slurm/cluster.sh env     # print `export SLURM_CONF=...` for the shell that submits jobs
#
# Everything lives under $DARTSWEEP_SLURM_DIR (default /tmp/dartsweep-slurm), on its own ports (16817/16818),
# so it does not touch a machine's real SLURM configuration. Needs root, or passwordless sudo.
set -euo pipefail

DIR=${DARTSWEEP_SLURM_DIR:-/tmp/dartsweep-slurm}
CONF=$DIR/slurm.conf
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "cluster.sh: needs root or passwordless sudo to run munged/slurmctld/slurmd" >&2; exit 2
    fi
fi

install_packages() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "cluster.sh: installing slurm-wlm and munge with apt-get" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        $SUDO sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null'
    fi
    $SUDO chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    $SUDO chmod 400 /etc/munge/munge.key
    $SUDO su -s /bin/sh munge -c /usr/sbin/munged
}

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    $SUDO mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    $SUDO tee "$CONF" >/dev/null <<EOF
ClusterName=dartsweep-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=10
ReturnToService=2
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() {  # the daemon whose pid file is $1 is alive
    [ -s "$1" ] && $SUDO kill -0 "$(cat "$1")" 2>/dev/null
}

case "${1:-}" in
install)
    install_packages
    ;;
start)
    install_packages
    start_munge
    if ! running "$DIR/slurmctld.pid" || ! running "$DIR/slurmd.pid"; then
        write_config
        running "$DIR/slurmctld.pid" || $SUDO slurmctld -f "$CONF"
        running "$DIR/slurmd.pid" || $SUDO slurmd -f "$CONF"
    fi
    for _ in $(seq 1 60); do  # the node comes up idle within seconds
        if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "cluster.sh: SLURM is up (SLURM_CONF=$CONF)" >&2
            exit 0
        fi
        sleep 1
    done
    echo "cluster.sh: the node did not come up; see $DIR/log/" >&2
    exit 1
    ;;
stop)
    for d in slurmd slurmctld; do
        if running "$DIR/$d.pid"; then $SUDO kill "$(cat "$DIR/$d.pid")"; fi
    done
    sleep 1
    $SUDO rm -rf "$DIR"
    ;;
env)
    echo "export SLURM_CONF=$CONF"
    ;;
*)
    echo "usage: $0 install|start|stop|env" >&2
    exit 2
    ;;
esac
