#!/usr/bin/env bash
# Stop the private cluster that tests/slurm/setup.sh DIR started: cancel its jobs and wait for
# them to end, then stop slurmd, slurmctld and munged by their pid files under DIR (never by
# name: a system Slurm on the same host is left alone). --purge also deletes DIR.
#
# Usage: tests/slurm/teardown.sh DIR [--purge]
# Exit codes: 0 stopped (or nothing was running); 1 a daemon needed SIGKILL; 2 usage.
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: $0 DIR [--purge]" >&2; exit 2; fi
DIR=$1
PURGE=${2:-}
[ -z "$PURGE" ] || [ "$PURGE" = "--purge" ] || { echo "usage: $0 DIR [--purge]" >&2; exit 2; }
export SLURM_CONF=$DIR/slurm.conf
status=0

alive() {  # $1 = pid file
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {  # $1 = pid file: SIGTERM, up to 15 s, then SIGKILL
  alive "$1" || { rm -f "$1"; return 0; }
  local pid
  pid=$(cat "$1")
  kill -TERM "$pid"
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    sleep 0.25
  done
  echo "warning: pid $pid ($1) ignored SIGTERM for 15 s: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null
  rm -f "$1"
  status=1
}

# 1. the jobs: cancel, then wait (up to 60 s) until slurmd has cleaned them up
if [ -f "$SLURM_CONF" ] && alive "$DIR/run/slurmctld.pid"; then
  mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
  if [ "${#jobs[@]}" -gt 0 ]; then
    scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 240); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.25
    done
  fi
fi
# 2. the daemons, slurmd first (slurmctld's slurmscriptd child exits with it)
stop "$DIR/run/slurmd.pid"
stop "$DIR/run/slurmctld.pid"
stop "$DIR/munge/munged.pid"
if [ "$PURGE" = "--purge" ]; then
  rm -rf "$DIR"
fi
echo "slurm stopped ($DIR)"
exit "$status"
