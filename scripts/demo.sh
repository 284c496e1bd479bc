#!/usr/bin/env bash
# The whole varshift path on the shipped sample model (sample_models/README.md):
# scan -> probe -> recalibrate --exact (held-out metrics) -> probe again -> export with parity.
# scan and the first probe are expected to exit 1: they found the shift. The demo fails if any
# step hits bad input or a bug (exit >= 2), if the fixed model still shows a shift, or if the
# ONNX parity check fails.
set -uo pipefail
VENV=${VENV:-.venv}
OUT=${OUT:-out}
V="$VENV/bin/varshift"
M=sample_models
mkdir -p "$OUT"
status=0

# step EXPECTED_EXIT WHY command...
# Prints the command so that it can be pasted from the repository root (arguments quoted as a
# person would type them), runs it, and says what its exit code means here.
step() {
    local expected=$1 why=$2
    shift 2
    printf '\n$'
    local arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            printf ' %s' "$arg"
        else  # single quotes, as a person would type it
            printf " '%s'" "${arg//\'/\'\\\'\'}"
        fi
    done
    printf '\n'
    "$@"
    local rc=$?
    if [ "$rc" -eq "$expected" ]; then
        echo "(exit $rc: $why)"
    else
        echo "(exit $rc; expected $expected: $why)"
        echo "demo: step failed" >&2
        status=1
    fi
}

FOUND="expected: the unfixed sample model has the shift, and the exit code says so"
step 1 "$FOUND" "$V" scan $M/digits_dropout_bn.pt
step 1 "$FOUND" "$V" scan $M/digits_functional_ckpt.pt --arch $M/digits_functional.py:build \
    --arch-args '{"drop_rate": 0.3}'
step 1 "$FOUND" "$V" probe $M/digits_dropout_bn.pt --data $M/digits_calib.pt --fail-above 1.2
step 0 "fixed; held-out accuracy may move by one image, see the NLL" \
    "$V" recalibrate $M/digits_dropout_bn.pt --data $M/digits_calib.pt --exact \
    --eval-data $M/digits_test.pt --output "$OUT/digits_fixed.pt"
step 0 "the fixed model has no shift left" \
    "$V" probe "$OUT/digits_fixed.pt" --data $M/digits_calib.pt --fail-above 1.2
step 0 "onnxruntime matches PyTorch" \
    "$V" export "$OUT/digits_fixed.pt" --data $M/digits_calib.pt --output "$OUT/digits_fixed.onnx"
echo
if [ "$status" -eq 0 ]; then
    echo "demo: ok: fixed model in $OUT/digits_fixed.pt, ONNX in $OUT/digits_fixed.onnx"
else
    echo "demo: FAILED (see above)" >&2
fi
exit $status
