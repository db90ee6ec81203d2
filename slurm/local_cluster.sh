#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests: everything (config, state, logs, sockets, database)
# lives in one directory, every daemon's PID is recorded there, and `stop` ends exactly those PIDs.
#
#   slurm/local_cluster.sh start DIR [--no-accounting] [--watch PID]
#        install if missing, configure, start, wait for idle; --watch: stop by itself once PID has exited
#   slurm/local_cluster.sh stop DIR      cancel its jobs, stop the daemons it started
#   export SLURM_CONF=DIR/slurm.conf     then sinfo, sbatch, submitit use it
#
# Needs root (apt-get, daemons). Exit codes: 0 ok; 3 a prerequisite is missing (not root, packages
# not installable): callers skip; anything else is a real failure (logs under DIR/log).
# Accounting (slurmdbd + a private MariaDB) is on by default: without it `sacct` fails and submitit
# cannot see cancelled, failed or requeued jobs. Memory and CPU limits are not enforced (no cgroups).
set -euo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
CMD=$1 DIR=$2 ACCOUNTING=1 WATCH=
shift 2
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-accounting) ACCOUNTING=0 ;;
    --watch) WATCH=${2:?--watch needs a PID}; shift ;;
    *) usage ;;
  esac
  shift
done
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
PIDS=$DIR/pids
log() { echo "[local_cluster] $*" >&2; }
missing() { log "$*"; exit 3; }

# ------------------------------------------------------------------------------------------ stop
alive() {  # name pid: the PID still runs that program (not a recycled PID)
  [[ -r /proc/$2/cmdline ]] && tr '\0' ' ' </proc/"$2"/cmdline | grep -q "$1"
}

stop() {
  [[ -f $PIDS ]] || return 0
  if grep -q '^slurmctld ' "$PIDS"; then  # cancel our jobs first, so no slurmstepd outlives slurmd
    SLURM_CONF=$DIR/slurm.conf timeout 10 scancel --user=root --full 2>/dev/null || true
    for _ in $(seq 50); do
      [[ -z $(SLURM_CONF=$DIR/slurm.conf timeout 5 squeue -h -t R,CG 2>/dev/null) ]] && break; sleep 0.2
    done
  fi
  # SIGTERM to all (slurm's daemons first), up to 15 s for them to exit, then SIGKILL
  local left=()
  while read -r name pid; do alive "$name" "$pid" && kill -TERM "$pid" 2>/dev/null && left+=("$name:$pid"); done < <(tac "$PIDS")
  for _ in $(seq 150); do
    local still=()
    for np in "${left[@]}"; do alive "${np%%:*}" "${np##*:}" && still+=("$np"); done
    left=("${still[@]}"); (( ${#left[@]} )) || break; sleep 0.1
  done
  for np in "${left[@]}"; do log "${np%%:*} (${np##*:}) ignored SIGTERM; killing"; kill -KILL "${np##*:}" 2>/dev/null || true; done
  rm -f "$PIDS"
  [[ -f $DIR/rundir ]] && rm -rf "$(cat "$DIR/rundir")" "$DIR/rundir"
  log "stopped"
}

if [[ $CMD == stop ]]; then stop; exit 0; fi
[[ $CMD == start ]] || usage

# ----------------------------------------------------------------------------------------- start
[[ $(id -u) == 0 ]] || missing "needs root (daemons, apt-get); running as $(id -un)"
[[ -f $PIDS ]] && { log "$DIR already has a running cluster (stop it first)"; exit 1; }
trap 'rc=$?; [[ $rc == 0 || $rc == 3 ]] || { log "start failed ($rc), stopping what was started"; stop; }' EXIT

PKGS="munge slurmctld slurmd slurm-client"
NEED="munged slurmctld slurmd sinfo sbatch sacct"
if (( ACCOUNTING )); then PKGS+=" slurmdbd mariadb-server mariadb-client"; NEED+=" slurmdbd mariadbd mariadb-install-db"; fi
need_install=0
for b in $NEED; do command -v "$b" >/dev/null || need_install=1; done
if (( need_install )); then
  command -v apt-get >/dev/null || missing "slurm is not installed and there is no apt-get"
  log "installing $PKGS"
  # keep the packages from starting their services (no init system here; we start our own daemons)
  created_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d; created_policy=1; fi
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PKGS >"$DIR/apt.log" 2>&1; }
  ok=1
  apt_install || { apt-get update -q >>"$DIR/apt.log" 2>&1 && apt_install; } || ok=0
  (( created_policy )) && rm -f /usr/sbin/policy-rc.d
  (( ok )) || missing "apt-get install $PKGS failed (see $DIR/apt.log)"
fi

free_ports() {  # N distinct free TCP ports on 127.0.0.1
  python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
wait_for() {  # seconds description command...: poll until the command succeeds
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}
started() { echo "$1 $2" >>"$PIDS"; }

HOST=$(hostname -s)
CPUS=$(( $(nproc) > 8 ? $(nproc) : 8 ))  # declared CPUs: at least 8, so a few 1-CPU test jobs run at once
MEM=$(( $(free -m | awk '/^Mem:/ {print $7}') * 9 / 10 ))
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT < <(free_ports 4)
mkdir -p "$DIR"/{state,spool,log}
: >"$PIDS"
# sockets go to a short directory every user can reach (DIR may be long, or below a private directory)
RUN=$(mktemp -d /tmp/lslurm.XXXXXX)
echo "$RUN" >"$DIR/rundir"
chmod 755 "$RUN"
mkdir "$RUN/munge"

# munge: a private daemon and socket (munged refuses to run as root); the key is Debian's
chown munge:munge "$RUN/munge"
MUNGE_SOCKET=$RUN/munge/munge.socket
setpriv --reuid=munge --regid=munge --clear-groups munged --foreground --force \
  --socket="$MUNGE_SOCKET" --key-file=/etc/munge/munge.key --pid-file="$RUN/munge/munged.pid" \
  --log-file="$RUN/munge/munged.log" --seed-file="$RUN/munge/munged.seed" >"$DIR/log/munged.out" 2>&1 &
started munged $!
wait_for 10 munged bash -c "munge -S '$MUNGE_SOCKET' -n </dev/null | unmunge -S '$MUNGE_SOCKET'"

AUTH="AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET"  # slurm.conf adds cred_expire=5: a requeued job may restart 5 s later (not 120)

if (( ACCOUNTING )); then
  DB=$DIR/mariadb
  mkdir -p "$DB"
  mariadb-install-db --no-defaults --user=root --datadir="$DB/data" --auth-root-authentication-method=socket \
    --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --user=root --datadir="$DB/data" --socket="$RUN/mysqld.sock" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --pid-file="$DB/mysqld.pid" --log-error="$DIR/log/mariadb.log" \
    --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  started mariadbd $!
  wait_for 30 mariadb mariadb --no-defaults -S "$RUN/mysqld.sock" -uroot -e 'select 1'
  DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  mariadb --no-defaults -S "$RUN/mysqld.sock" -uroot -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS'; CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  cat >"$DIR/slurmdbd.conf" <<EOF
$AUTH
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$DIR/state/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF
  chmod 600 "$DIR/slurmdbd.conf"
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET"  # for slurmdbd this is the munge socket (AuthInfo does not apply)
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

cat >"$DIR/slurm.conf" <<EOF
# written by slurm/local_cluster.sh for a one-node test cluster
ClusterName=pipelinetest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH,cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( MEM / CPUS ))
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
InactiveLimit=0
JobRequeue=1
$ACCT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$DIR/slurm.conf

if (( ACCOUNTING )); then
  slurmdbd -D >"$DIR/log/slurmdbd.out" 2>&1 &
  started slurmdbd $!
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
fi
slurmctld -D -i >"$DIR/log/slurmctld.out" 2>&1 &
started slurmctld $!
wait_for 30 slurmctld scontrol ping
slurmd -D -N "$HOST" >"$DIR/log/slurmd.out" 2>&1 &
started slurmd $!
wait_for 60 "node $HOST idle" bash -c "sinfo -h -n '$HOST' -o %t | grep -qx idle"
if (( ACCOUNTING )); then wait_for 30 sacct sacct -n -X -S now; fi
if [[ -n $WATCH ]]; then  # ends by itself after a normal stop (the PID file is gone)
  nohup bash -c "while kill -0 $WATCH && [[ -f '$PIDS' ]]; do sleep 2; done 2>/dev/null
                 [[ -f '$PIDS' ]] && exec '$0' stop '$DIR'" >"$DIR/log/watch.out" 2>&1 </dev/null &
fi
log "up: export SLURM_CONF=$SLURM_CONF"
echo "export SLURM_CONF=$SLURM_CONF"
