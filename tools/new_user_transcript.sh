#!/usr/bin/env bash
# A new user's first session, from a fresh clone: `make demo`, then report, decode and eval, each
# timed.
#
#   bash tools/new_user_transcript.sh [--smoke] [REPO [DEST]] > transcript.md
#
# REPO (default: the checkout holding this script) is cloned into DEST (default
# ${TMPDIR:-/tmp}/onnxhq-fresh): only committed files travel, as for a real user. The transcript
# (Markdown) goes to stdout; the exit status is that of the first failed command, or 0.
# --smoke: no `make demo` (it builds a virtual environment from the package index); the demo's
# commands run with $PYTHON (default python3, which must have onnxhq's dependencies) on the clone's
# own onnxhq, and DEST is a temporary folder, removed at the end.
set -uo pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    shift
fi
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPO=${1:-$HERE}
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # before the cd
if [ $SMOKE -eq 1 ]; then
    DEST=${2:-$(mktemp -d "${TMPDIR:-/tmp}/onnxhq-smoke-XXXXXX")/fresh}
    trap 'rm -rf "$(dirname "$DEST")"' EXIT
else
    DEST=${2:-${TMPDIR:-/tmp}/onnxhq-fresh}
fi
MARK=.onnxhq-transcript  # left in DEST so that a rerun may remove what an earlier run made, only

if [ -e "$DEST" ]; then
    if [ ! -e "$DEST/$MARK" ]; then
        echo "$DEST exists and was not made by this script; remove it or pass another DEST" >&2
        exit 2
    fi
    rm -rf "$DEST"
fi

exec 2>&1
TIMEFORMAT=$'[%1R s wall, %1U s user]'
status=0

run() {
    printf '\n$ %s\n' "$*"
    time "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "[exit $rc]"
        [ $status -eq 0 ] && status=$rc
    fi
    return $rc
}

echo "# onnxhq: a new user's session from a fresh clone"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -sm), $(nproc) CPUs, $(python3 --version)"
echo
echo '```console'
run git clone --quiet "$REPO" "$DEST" || { echo '```'; exit $status; }
touch "$DEST/$MARK"
cd "$DEST" || exit 1
echo "(commit $(git rev-parse --short HEAD): $(git log -1 --format=%s))"
if [ $SMOKE -eq 1 ]; then
    onnxhq() { "$PY" -m onnxhq "$@"; }
    run onnxhq compress models/lenet5_mnist.onnx --data models/mnist_sample.npz \
        --eval models/mnist_sample.npz -o out/lenet5 --report-json out/lenet5/report.json
    ONNXHQ=onnxhq
else
    run make demo
    ONNXHQ=.venv/bin/onnxhq
fi
run $ONNXHQ report out/lenet5/lenet5_mnist.onnx
run $ONNXHQ decode out/lenet5/lenet5_mnist.onnx -o lenet5_decoded.onnx
run $ONNXHQ eval lenet5_decoded.onnx --data models/mnist_sample.npz
run $ONNXHQ eval out/lenet5/lenet5_mnist.onnx --data models/mnist_sample.npz
run ls -l out/lenet5 lenet5_decoded.onnx models/lenet5_mnist.onnx
echo '```'
exit $status
