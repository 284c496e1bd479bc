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

# step EXPECTED_EXIT command...
step() {
    local expected=$1
    shift
    printf '\n$ %s\n' "$*"
    "$@"
    local rc=$?
    echo "(exit $rc)"
    if [ "$rc" -ne "$expected" ]; then
        echo "demo: expected exit $expected" >&2
        status=1
    fi
}

step 1 "$V" scan $M/digits_dropout_bn.pt
step 1 "$V" scan $M/digits_functional_ckpt.pt --arch $M/digits_functional.py:build \
    --arch-args '{"drop_rate": 0.3}'
step 1 "$V" probe $M/digits_dropout_bn.pt --data $M/digits_calib.pt --fail-above 1.2
step 0 "$V" recalibrate $M/digits_dropout_bn.pt --data $M/digits_calib.pt --exact \
    --eval-data $M/digits_test.pt --output "$OUT/digits_fixed.pt"
step 0 "$V" probe "$OUT/digits_fixed.pt" --data $M/digits_calib.pt --fail-above 1.2
step 0 "$V" export "$OUT/digits_fixed.pt" --data $M/digits_calib.pt --output "$OUT/digits_fixed.onnx"
echo
if [ "$status" -eq 0 ]; then
    echo "demo: ok: fixed model in $OUT/digits_fixed.pt, ONNX in $OUT/digits_fixed.onnx"
else
    echo "demo: FAILED (see above)" >&2
fi
exit $status
