#!/usr/bin/env bash
# A real two-node SLURM cluster on localhost for the SLURM tests: munged, slurmctld and two slurmd (nodes
# dartsweep1 and dartsweep2, each with this machine's CPUs: `slurmd -N`, one host) from Debian's packages
# (slurm-wlm, munge), installed with apt-get when sbatch is missing.
#
#   tests/slurm/cluster.sh install # apt-get install slurm-wlm munge, when sbatch is missing
#   tests/slurm/cluster.sh start   # install if needed, write the config, start the daemons, wait for the node
#   tests/slurm/cluster.sh stop    # stop the daemons started here (munged too, if `start` started it) and
#                                  # remove the state folder
#   tests/slurm/cluster.sh env     # print `export SLURM_CONF=...` for the shell that submits jobs
#
# Everything lives in a folder made fresh by root with `mktemp -d` at each start (a random name, so no other
# local user can have made it first and planted a config, a Prolog say, that root would run; then 0755
# like any slurm.conf, so a sudo user's sbatch reads it; its path is kept in /run/dartsweep-slurm.dir,
# which only root can write), or in $DARTSWEEP_SLURM_DIR if set, on its own ports (16817-16820), so it
# does not touch a machine's real SLURM configuration. Needs root, or passwordless sudo.
#
# The nodes share this host's file system but for one folder, $DIR/node1-only: every slurmd but the first
# runs in a mount namespace of its own where an empty tmpfs covers it, so what a test puts there is on the
# first node only, as on a cluster without a shared file system (the plugin test: Ray must ship it).
set -euo pipefail

POINTER=/run/dartsweep-slurm.dir
MUNGED_OURS=/run/dartsweep-munged.started  # munged was started by this script
if [ -n "${DARTSWEEP_SLURM_DIR:-}" ]; then
    DIR=$DARTSWEEP_SLURM_DIR
elif [ -s "$POINTER" ] && [ -d "$(cat "$POINTER")" ] && [ "$(stat -c %u "$(cat "$POINTER")")" = 0 ]; then
    DIR=$(cat "$POINTER")  # the folder the running cluster was started in
else
    DIR=""  # made by `start`
fi
set_paths() {
    CONF=$DIR/slurm.conf
    NODE1_ONLY=$DIR/node1-only
}
set_paths
NODES=(dartsweep1 dartsweep2)  # slurmd -N each, on ports 16819 onwards
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
    if pgrep -x -r R,S,D munged >/dev/null; then return; fi  # not a zombie: one `stop` killed, not yet reaped
    if [ ! -s /etc/munge/munge.key ]; then  # munge never set up here: a key of its own (else left alone)
        $SUDO mkdir -p /etc/munge /var/log/munge /var/lib/munge
        $SUDO sh -c 'umask 077; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null'
        $SUDO chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge
        $SUDO chmod 400 /etc/munge/munge.key
    fi
    if [ ! -d /run/munge ]; then  # /run is new at each boot; a container has no systemd to make it
        $SUDO mkdir -p /run/munge
        $SUDO chown munge:munge /run/munge
    fi
    $SUDO su -s /bin/sh munge -c /usr/sbin/munged
    $SUDO touch "$MUNGED_OURS"  # `stop` stops it again; a munged that was running already is left alone
}

stop_munge() {
    if [ -f "$MUNGED_OURS" ]; then
        if running /run/munge/munged.pid; then $SUDO kill "$(cat /run/munge/munged.pid)"; fi
        $SUDO rm -f "$MUNGED_OURS"
    fi
}

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    $SUDO mkdir -p "$DIR/state" "$DIR/log" "${NODES[@]/#/$DIR/spool-}"
    $SUDO tee "$CONF" >/dev/null <<EOF
ClusterName=dartsweep-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
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
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((16819 + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done | $SUDO tee -a "$CONF" >/dev/null
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" \
        | $SUDO tee -a "$CONF" >/dev/null
}

running() {  # the daemon whose pid file is $1 is alive (not a zombie: a container's init may not reap)
    local state
    [ -s "$1" ] && state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) && [[ -n "$state" && "$state" != Z* ]]
}

all_running() {  # and every node but the first blind to $NODE1_ONLY (a cluster started before it was not)
    running "$DIR/slurmctld.pid" || return 1
    for node in "${NODES[@]}"; do running "$DIR/slurmd-$node.pid" || return 1; done
    for node in "${NODES[@]:1}"; do
        $SUDO nsenter -t "$(cat "$DIR/slurmd-$node.pid")" -m test ! -e "$NODE1_ONLY/.marker" || return 1
    done
}

start_slurmd() {  # $1: the node's index; every node but the first cannot see $NODE1_ONLY
    if [ "$1" = 0 ]; then
        $SUDO slurmd -f "$CONF" -N "${NODES[$1]}"
    else
        $SUDO unshare -m --propagation private sh -c 'mount -t tmpfs -o mode=0755 tmpfs "$1" && exec slurmd -f "$2" -N "$3"' \
            sh "$NODE1_ONLY" "$CONF" "${NODES[$1]}"
    fi
}

stop_daemons() {  # slurmd.pid: the one-node layout of earlier versions
    local stopped=""
    for d in "${NODES[@]/#/slurmd-}" slurmd slurmctld; do
        if running "$DIR/$d.pid"; then $SUDO kill "$(cat "$DIR/$d.pid")"; stopped=1; fi
    done
    if [ -n "$stopped" ]; then sleep 1; fi
}

case "${1:-}" in
install)
    install_packages
    ;;
start)
    install_packages
    start_munge
    if [ -z "$DIR" ] || ! all_running; then
        if [ -n "$DIR" ]; then
            stop_daemons  # what is left of an earlier cluster (or an older layout) restarts with this config
        fi
        if [ -z "${DARTSWEEP_SLURM_DIR:-}" ]; then
            [ -n "$DIR" ] && $SUDO rm -rf "$DIR"
            LEGACY=/tmp/dartsweep-slurm  # the fixed folder of earlier versions: its daemons hold the ports
            if [ -d "$LEGACY" ] && [ "$(stat -c %u "$LEGACY")" = 0 ]; then
                DIR=$LEGACY stop_daemons
                $SUDO rm -rf "$LEGACY"
            fi
            DIR=$($SUDO mktemp -d /tmp/dartsweep-slurm.XXXXXXXX)
            $SUDO chmod 755 "$DIR"
            echo "$DIR" | $SUDO tee "$POINTER" >/dev/null
            set_paths
        fi
        STARTED="(started here)"
        write_config
        $SUDO mkdir -p "$NODE1_ONLY"
        $SUDO touch "$NODE1_ONLY/.marker"
        $SUDO slurmctld -f "$CONF"
        for i in "${!NODES[@]}"; do start_slurmd "$i"; done
    fi
    for _ in $(seq 1 60); do  # the nodes come up idle within seconds
        if [ "$(SLURM_CONF=$CONF sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = "${#NODES[@]}" ]; then
            echo "cluster.sh: SLURM is up ${STARTED:-(already running)} (SLURM_CONF=$CONF)" >&2
            exit 0
        fi
        sleep 1
    done
    echo "cluster.sh: the nodes did not come up; see $DIR/log/" >&2
    exit 1
    ;;
stop)
    if [ -n "$DIR" ]; then
        stop_daemons
        $SUDO rm -rf "$DIR"
    fi
    [ -n "${DARTSWEEP_SLURM_DIR:-}" ] || $SUDO rm -f "$POINTER"
    stop_munge
    ;;
env)
    [ -n "$DIR" ] || { echo "cluster.sh: no test cluster is running (cluster.sh start)" >&2; exit 1; }
    echo "export SLURM_CONF=$CONF"
    echo "export DARTSWEEP_NODE1_ONLY=$NODE1_ONLY"
    ;;
*)
    echo "usage: $0 install|start|stop|env" >&2
    exit 2
    ;;
esac
