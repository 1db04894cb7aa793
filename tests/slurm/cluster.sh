#!/usr/bin/env bash
# A one-node SLURM cluster for the tests marked `slurm` (make test-slurm), then the command given.
#
# As root with apt: installs munge, slurmctld, slurmd, slurmdbd and MariaDB where missing; writes
# every config into a temporary directory (2 CPUs or what the machine has, its memory, partition
# `lata`, select/cons_tres, accounting through slurmdbd so that sacct answers, as submitit asks
# it); starts the daemons on ports of their own, waits until sinfo shows the node idle, runs the
# command with SLURM_CONF set, and stops every daemon it started, also when the command fails.
set -euo pipefail

say() { echo "test-slurm: $*"; }
if [ "$(id -u)" != 0 ]; then say "needs root (apt and the daemons)"; exit 2; fi
command -v apt-get >/dev/null || { say "needs apt-get"; exit 2; }
[ $# -gt 0 ] || { say "usage: $0 COMMAND..."; exit 2; }

packages=(munge slurmctld slurmd slurmdbd slurm-client mariadb-server)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # policy-rc.d: the packages' own services stay stopped (this script starts its own)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

dir=$(mktemp -d /tmp/lata-slurm.XXXXXX)
chmod 755 "$dir"
mkdir -p "$dir"/{state,spool,munge,log,db,run}
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 95 / 100 ))
pids=()

stop() {
  local status=$?
  for pidfile in "$dir"/run/slurmd.pid "$dir"/run/slurmctld.pid "$dir"/run/slurmdbd.pid "$dir"/run/munged.pid \
                 "$dir"/run/mariadb.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  sleep 1
  if [ $status -ne 0 ]; then
    for f in "$dir"/log/*.log; do echo "--- $f (last lines)"; tail -5 "$f"; done
  fi
  rm -rf "$dir"
  exit $status
}
trap stop EXIT INT TERM

wait_for() {  # seconds, what, command...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { say "$what did not come up"; return 1; }
    sleep 0.5
  done
}

# munge on its default socket (every SLURM client looks there): the running one, else one with a
# key of its own, stopped at the end
socket=/run/munge/munge.socket.2
if munge -n -S "$socket" 2>/dev/null | unmunge -S "$socket" >/dev/null 2>&1; then
  say "using the munged already running"
else
  mkdir -p /run/munge
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$socket" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
fi

# MariaDB for slurmdbd, in the temporary directory, on 127.0.0.1 and a port of its own
mariadb-install-db --no-defaults --datadir="$dir/db" --user=root --auth-root-authentication-method=normal \
  >"$dir/log/mariadb-install.log" 2>&1
mariadbd --no-defaults --datadir="$dir/db" --socket="$dir/run/mysql.sock" --bind-address=127.0.0.1 --port=16806 \
  --user=root --pid-file="$dir/run/mariadb.pid" --log-error="$dir/log/mariadb.log" >/dev/null 2>&1 &
pids+=($!)
wait_for 60 MariaDB mariadb --no-defaults --socket="$dir/run/mysql.sock" -uroot -e "select 1"
mariadb --no-defaults --socket="$dir/run/mysql.sock" -uroot -e "create database slurm_acct_db;
  create user 'slurm'@'%' identified by 'lata'; grant all on slurm_acct_db.* to 'slurm'@'%';
  create user 'slurm'@'localhost' identified by 'lata'; grant all on slurm_acct_db.* to 'slurm'@'localhost';"

cat > "$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=lata
StoragePort=16806
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
CONF
chmod 600 "$dir/slurmdbd.conf"

cat > "$dir/slurm.conf" <<CONF
ClusterName=lata
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=lata Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"

# slurmdbd reads its config from beside slurm.conf
slurmdbd -D >/dev/null 2>&1 &
pids+=($!)
wait_for 60 slurmdbd sacctmgr -i list cluster
sacctmgr -i add cluster lata >/dev/null 2>&1 || true
slurmctld -D >/dev/null 2>&1 &
pids+=($!)
slurmd -D -N "$host" >/dev/null 2>&1 &
pids+=($!)
wait_for 90 "the node" bash -c "sinfo -h -o %T | grep -qx idle"
say "one-node cluster up: partition lata, $cpus CPUs, ${mem} MB ($dir)"

export LATA_SLURM_PARTITION=lata
"$@"
