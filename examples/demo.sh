#!/usr/bin/env bash
# The demo behind `make demo` (and `make demo QUICK=1`): start the control service (embedded Ray,
# SQLite store under .stillroom/), submit the ticket recipe through the gRPC API, watch it live,
# print the job's report. Exits non-zero when the job fails, including when its evaluation gates
# fail (the tuned teacher must beat the base teacher, the distilled student its labelled-only twin).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
HOME_DIR=.stillroom/demo
ADDRESS=127.0.0.1:${STILLROOM_DEMO_PORT:-50151}
DEFAULT=examples/tickets_pipeline.yaml
[ -n "${QUICK:-}" ] && DEFAULT=examples/tickets_quick.yaml
# TASK=arith (make demo TASK=arith): examples/arith_grpo.yaml, its data from examples/arith/generate.py
TASK=${TASK:-tickets}
[ "$TASK" != tickets ] && DEFAULT=examples/${TASK}_grpo.yaml
RECIPE=${1:-$DEFAULT}
mkdir -p "$HOME_DIR"

$BIN/python -m "examples.$TASK.generate" --out "examples/$TASK/data"
export STILLROOM_TOKEN=${STILLROOM_TOKEN:-$($BIN/python -c 'import secrets; print(secrets.token_hex(16))')}
export STILLROOM_TOKENS="demo=$STILLROOM_TOKEN" STILLROOM_ADDRESS=$ADDRESS
# reward functions of examples/ (--reward-module examples) import from this checkout, in the server and its workers
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$BIN/stillroom serve --address "$ADDRESS" --home "$HOME_DIR" --data-root . --reward-module examples > "$HOME_DIR/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  grep -q "listening on" "$HOME_DIR/server.log" && break
  kill -0 $SERVER 2>/dev/null || { cat "$HOME_DIR/server.log"; exit 1; }
  sleep 0.5
done
echo "control service up at $ADDRESS (log: $HOME_DIR/server.log)"

$BIN/stillroom validate "$RECIPE"
set +e
$BIN/stillroom submit "$RECIPE" --wait
STATUS=$?
set -e
JOB=$($BIN/stillroom list -o json --limit 1 | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
echo
$BIN/stillroom report "$JOB"
echo
echo "artifacts: $HOME_DIR/artifacts/$JOB/ (report/report.md with plots; tensorboard --logdir $HOME_DIR/artifacts/$JOB/tensorboard)"
[ "$STATUS" = 0 ] || { echo "the job did not succeed:"; $BIN/stillroom get "$JOB" | grep '^error' || true; }
exit $STATUS
