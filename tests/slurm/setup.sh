#!/usr/bin/env bash
# Start a private one-node Slurm cluster on 127.0.0.1 (munged + slurmctld + slurmd), for
# tests/test_slurm.py or by hand. Needs root and the Debian packages
#     apt-get install --no-install-recommends slurmctld slurmd slurm-client munge
# (Slurm 22.05 on Debian 12 is what this was written and tested on).
#
# Usage: tests/slurm/setup.sh DIR
#   Everything lives under DIR (created if missing): slurm.conf, the munge key and socket, state,
#   spool, logs and pid files. Nothing in /etc, /run or /var is read or written, so a system Slurm
#   or munge on the same host is left alone. Then point the Slurm commands at the cluster:
#       export SLURM_CONF=DIR/slurm.conf
#   and stop it with tests/slurm/teardown.sh DIR [--purge].
# Environment: SLURMCTLD_PORT (default 6817), SLURMD_PORT (default 6818).
# Exit codes: 0 the node is idle and takes jobs; 1 something failed (the daemon logs are shown);
# 2 usage.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "error: $0 must run as root (slurmd starts jobs as any user)" >&2; exit 1; }
for cmd in munged mungekey munge unmunge slurmctld slurmd sbatch sinfo scontrol; do
  command -v "$cmd" >/dev/null || { echo "error: $cmd is not installed" >&2; exit 1; }
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
HOST=$(hostname -s)
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

show_logs() {
  tail -n 20 "$DIR"/log/*.log "$DIR"/munge/munged.log >&2 2>/dev/null || true
}
alive() {  # $1 = pid file
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# munged refuses a socket folder that not everyone may enter, and a key that others may read
mkdir -p "$DIR"/{munge,state,spool,log,run}
chmod 755 "$DIR" "$DIR/munge"
# --- munge: a private daemon with its own key --------------------------------------------------
[ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
chmod 600 "$DIR/munge/munge.key"
if ! alive "$DIR/munge/munged.pid"; then
  munged --socket="$DIR/munge/munge.sock" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
fi
for _ in $(seq 40); do
  munge -S "$DIR/munge/munge.sock" -n </dev/null | unmunge -S "$DIR/munge/munge.sock" >/dev/null 2>&1 && break
  sleep 0.25
done
munge -S "$DIR/munge/munge.sock" -n </dev/null | unmunge -S "$DIR/munge/munge.sock" >/dev/null \
  || { echo "error: munged does not answer" >&2; show_logs; exit 1; }

# --- slurm.conf from the template ---------------------------------------------------------------
MEM_MB=$(( $(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$(nproc)|g" \
    -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    "$HERE/slurm.conf.in" > "$CONF"
: > "$DIR/plugstack.conf"                   # no SPANK plugins (not the system's list)
echo "CgroupPlugin=autodetect" > "$DIR/cgroup.conf"   # unused (no cgroup plugins); silences slurmd

# --- the daemons (both fork into the background and write their pid files) ---------------------
alive "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF"     # -c: a fresh cluster, job ids from 1
alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" -N "$HOST"
state=
for _ in $(seq 120); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
  [[ "$state" == idle* ]] && break
  sleep 0.25
done
if [[ "$state" != idle* ]]; then
  echo "error: the node is not idle after 30 s (state: '${state:-no answer}')" >&2
  show_logs
  exit 1
fi
sinfo
echo "slurm ready: export SLURM_CONF=$CONF"
