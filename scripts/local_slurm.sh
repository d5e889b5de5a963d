#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, with accounting, for CI and for trying
# `python train.py -m cluster=slurm` on a laptop. Needs root and Debian/Ubuntu's packages:
#   apt-get install slurm-wlm slurmdbd munge mariadb-server
#
#   scripts/local_slurm.sh start [DIR]   # prints the line to export; idempotent
#   export SLURM_CONF=DIR/slurm.conf     # then sinfo, sbatch, sacct, python train.py -m cluster=slurm ...
#   scripts/local_slurm.sh stop [DIR]    # stops the daemons by their pid files; DIR keeps the logs
#
# Everything lives in DIR (default $LOCAL_SLURM_DIR, else /tmp/local-slurm): slurm.conf, the munge
# key and socket, the accounting database, state, spool, pid files and logs (DIR/log/). The node is
# this host with all its CPUs and no GPUs (no GRES), in one partition, `local`. Accounting is there
# because submitit learns a job's state from `sacct`: without it a job that dies before writing its
# result (a crash, a sys.exit) leaves `python train.py -m` waiting forever.
# The daemons listen on SLURMCTLD_PORT (default 6817) and the next two ports; set it to run two
# such clusters side by side.
set -euo pipefail

cmd="${1:-}"
dir="$(realpath -m "${2:-${LOCAL_SLURM_DIR:-/tmp/local-slurm}}")"
port="${SLURMCTLD_PORT:-6817}"
host="$(hostname -s)"
munge_socket="$dir/munge/munge.socket.2"
export SLURM_CONF="$dir/slurm.conf" MYSQL_UNIX_PORT="$dir/mysql.sock"  # (slurmdbd reaches the database there)

running() {  # running NAME: the daemon whose pid file is DIR/NAME.pid is alive
    [[ -f "$dir/$1.pid" ]] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null
}

wait_until() {  # wait_until WHAT COMMAND...: up to 60 s for COMMAND to succeed
    local what="$1"
    shift
    for _ in $(seq 120); do
        "$@" >/dev/null 2>&1 && return
        sleep 0.5
    done
    echo "error: $what did not come up; see $dir/log/" >&2
    exit 1
}

write_configs() {
    # A requeued job waits cred_expire seconds before it may start again (120 s by default), then
    # for a scheduling pass (every 60 s by default; the node is the scheduler's only work here).
    cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host
AccountingStoragePort=$((port + 2))
AccountingStoragePass=$munge_socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# every core (nproc alone reads OMP_NUM_THREADS: under a test worker's share the 2-task job could never start)
NodeName=$host CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd reads it beside slurm.conf, and only if no one else may read it (it could hold a password)
    cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_socket
DbdHost=$host
DbdPort=$((port + 2))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
EOF
    chmod 600 "$dir/slurmdbd.conf"
}

start_database() {
    [[ -d "$dir/mysql/mysql" ]] || mariadb-install-db --no-defaults --datadir="$dir/mysql" --user=root \
        --auth-root-authentication-method=normal --skip-test-db >"$dir/log/mariadb-install.log" 2>&1
    # mariadbd stays in the foreground: setsid detaches it from the caller's session like the others
    if ! running mariadbd; then
        setsid mariadbd --no-defaults --datadir="$dir/mysql" --user=root --skip-networking --socket="$MYSQL_UNIX_PORT" \
            --pid-file="$dir/mariadbd.pid" --log-error="$dir/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    fi
    wait_until "mariadbd" mariadb-admin --no-defaults --socket="$MYSQL_UNIX_PORT" -u root ping
}

start() {
    for tool in munged mariadbd slurmdbd slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "error: $tool not found: apt-get install slurm-wlm slurmdbd munge mariadb-server" >&2; exit 1; }
    done
    mkdir -p "$dir"/{munge,state,spool,log}
    chmod 700 "$dir/munge"  # munged refuses a key or socket others can reach
    if [[ ! -f "$dir/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    write_configs
    running munged || munged --force --socket="$munge_socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    start_database
    running slurmdbd || slurmdbd
    wait_until "slurmdbd" sacctmgr -n list cluster
    running slurmctld || slurmctld -f "$SLURM_CONF"
    running slurmd || slurmd -f "$SLURM_CONF"
    wait_until "the node" bash -c 'sinfo -h -N -o %t | grep -qx idle'
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local name pids=()
    for name in slurmd slurmctld slurmdbd mariadbd munged; do  # all at once: each takes a second or two
        if running "$name"; then
            pids+=("$(cat "$dir/$name.pid")")
            kill "${pids[-1]}"
        fi
        rm -f "$dir/$name.pid"
    done
    for pid in "${pids[@]}"; do  # up to 10 s to exit cleanly, then killed
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    done
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
