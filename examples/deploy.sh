#!/bin/sh
# deploy.sh — a deploy that runs on one machine at a time across the cluster.
#
#   deploy.sh APP VERSION
#
# The whole script runs under `flock /coord/locks/deploy` (the idiom of
# flock(1)): the script re-executes itself under flock, which takes coord's
# distributed lock through coordfs and holds it until the script ends, even
# if it is killed (the descriptor closes with the process).  Other machines'
# deploys wait in arrival order; DEPLOY_WAIT seconds (default 600) at most.
#
# While it holds the lock it records what it does in coord's config, with the
# lock's fencing token so that a later reader can tell deploys apart:
#   /coord/config/deploy/APP   -> "VERSION token=N host=H"
# Replace the `deploy_step` body with the real work.
set -eu
COORD=${COORD_MOUNT:-/coord}
LOCK=$COORD/locks/deploy
if [ -z "${DEPLOY_LOCKED:-}" ]; then
  DEPLOY_LOCKED=1 exec flock -w "${DEPLOY_WAIT:-600}" "$LOCK" "$0" "$@"
fi

app=${1:?usage: deploy.sh APP VERSION}
version=${2:?usage: deploy.sh APP VERSION}

# The lock file read by its holder: JSON with the note, token, ttl, waiters.
token=$(sed -n 's/.*"token": *\([0-9][0-9]*\).*/\1/p' "$LOCK" 2>/dev/null || true)

deploy_step() {
  # the real work: copy files, restart services, run migrations ...
  echo "deploying $app $version (token ${token:-?}) on $(hostname)"
  sleep "${DEPLOY_STEP_SECONDS:-0}"
}

deploy_step
mkdir -p "$COORD/config/deploy"
printf '%s token=%s host=%s\n' "$version" "${token:-?}" "$(hostname)" > "$COORD/config/deploy/$app"
