#!/usr/bin/env bash
# Relaunches a training job when it dies (a killed rank ends the whole mpirun job),
# up to a limit; the command should carry --auto-resume so that each relaunch
# continues from the newest valid checkpoint.
#
# usage: scripts/supervise.sh [--max-restarts N] [--delay S] [--before-restart CMD] -- \
#          mpirun -np 4 ./build/moetune train ... --auto-resume
#   --before-restart CMD  run `bash -c CMD` before each relaunch (e.g. free disk space,
#                         page someone); the job's exit code is in $SUPERVISE_RC.
set -uo pipefail
max=5
delay=1
before=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max-restarts) max=${2:?}; shift 2 ;;
    --delay) delay=${2:?}; shift 2 ;;
    --before-restart) before=${2:?}; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "supervise.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "supervise.sh: no command given (put it after --)" >&2; exit 2; }
restarts=0
while true; do
  "$@"
  rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "supervise.sh: job finished after $restarts restart(s)"
    exit 0
  fi
  if [[ $restarts -ge $max ]]; then
    echo "supervise.sh: job failed (exit $rc) and the restart limit ($max) is reached" >&2
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "supervise.sh: job exited with $rc; restart $restarts of $max in ${delay}s" >&2
  if [[ -n $before ]]; then
    SUPERVISE_RC=$rc bash -c "$before" || echo "supervise.sh: --before-restart command failed (exit $?)" >&2
  fi
  sleep "$delay"
done
