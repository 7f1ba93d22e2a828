#!/usr/bin/env bash
# Stop the daemons tests/slurm/start-single-node.sh started, one after another.
for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null && sleep 1
done
true
