#!/usr/bin/env bash
# A new user's first session, from a fresh clone: `make demo`, then report, decode and eval, each timed.
#
#   tools/new_user_transcript.sh [REPO [DEST]] > transcript.md
#
# REPO (default /work/main) is cloned into DEST (default /tmp/fresh): only committed files travel,
# as for a real user. The transcript (Markdown) goes to stdout; the exit status is that of the first
# failed command, or 0.
set -uo pipefail

REPO=${1:-/work/main}
DEST=${2:-/tmp/fresh}
MARK=.onnxhq-transcript  # left in DEST so that a rerun may remove what an earlier run made, and nothing else

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
run make demo
run .venv/bin/onnxhq report out/lenet5/lenet5_mnist.onnx
run .venv/bin/onnxhq decode out/lenet5/lenet5_mnist.onnx -o lenet5_decoded.onnx
run .venv/bin/onnxhq eval lenet5_decoded.onnx --data models/mnist_sample.npz
run .venv/bin/onnxhq eval out/lenet5/lenet5_mnist.onnx --data models/mnist_sample.npz
run ls -l out/lenet5 lenet5_decoded.onnx models/lenet5_mnist.onnx
echo '```'
exit $status
