#!/usr/bin/env bash
# varshift in CI: scan (SARIF for code scanning), recalibrate, check the fixed model, export it
# to ONNX with a parity check. Plain bash, for any CI system; the GitHub Actions workflow beside
# this file calls it, so what runs there is what the test suite runs.
#
# usage: varshift-ci.sh MODEL DATA [MODEL OPTIONS...]
#   MODEL          the trained model (torch.save file; a checkpoint needs --arch)
#   DATA           calibration data (.pt, .npy, .npz, or pkg.module:callable)
#   MODEL OPTIONS  passed to every command, e.g. --arch net.py:build --arch-args '{"p": 0.3}'
#
# environment:
#   MODE        fix (default): recalibrate, then fail if the fixed model is still shifted or
#               its ONNX export differs; check: only gate the model as it is (fail on scan
#               errors or a shift above FAIL_ABOVE), write nothing but reports
#   OUT         where everything goes (default varshift-out): scan.sarif; fix mode:
#               recalibrate.html, fixed-MODEL, model.onnx, probe.json, export.json;
#               check mode: probe.html
#   FAIL_ABOVE  the largest acceptable variance shift (default 1.05)
#   EVAL_DATA   held-out labelled data: accuracy/NLL before and after, and the data the
#               fixed model is checked on (default: DATA)
#   VARSHIFT    how to run varshift (default: varshift)
#
# exit status: 0 passed; 1 a gate failed (shift, scan error in check mode, ONNX parity);
# 2 bad input or usage (varshift's own message is on stderr).
set -uo pipefail

if [ $# -lt 2 ]; then
    sed -n '6,22p' "$0" >&2
    exit 2
fi
MODEL=$1
DATA=$2
shift 2
MODE=${MODE:-fix}
OUT=${OUT:-varshift-out}
FAIL_ABOVE=${FAIL_ABOVE:-1.05}
EVAL_DATA=${EVAL_DATA:-}
read -r -a VS <<< "${VARSHIFT:-varshift}"
case "$MODE" in fix|check) ;; *) echo "varshift-ci: MODE must be fix or check, got '$MODE'" >&2; exit 2;; esac
mkdir -p "$OUT"

status=0
step() {  # step NAME CMD...: run, keep the worst status; usage errors stop at once
    local name=$1; shift
    echo "== varshift $name"
    "$@"
    local rc=$?
    if [ "$rc" -ge 2 ]; then
        echo "varshift-ci: $name failed with exit status $rc" >&2
        exit "$rc"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "varshift-ci: $name: gate failed (exit 1)" >&2
        status=1
    fi
    return 0
}

# 1. The static scan, as SARIF (code scanning annotates the lines). In fix mode its
#    findings are what the next steps fix, so they do not fail the job by themselves.
fail_on=never
[ "$MODE" = check ] && fail_on=error
step scan "${VS[@]}" scan "$MODEL" "$@" --fail-on "$fail_on" --report "$OUT/scan.sarif"
held=()
[ -n "$EVAL_DATA" ] && held=(--eval-data "$EVAL_DATA")
CHECK_DATA=${EVAL_DATA:-$DATA}

if [ "$MODE" = check ]; then
    step probe "${VS[@]}" probe "$MODEL" --data "$CHECK_DATA" "$@" --fail-above "$FAIL_ABOVE" \
        --report "$OUT/probe.html"
    exit "$status"
fi

# 2. Recalibrate (exact: shift 1.000 on the calibration data), 3. check the fixed model on the
#    held-out data, 4. export it and compare onnxruntime with PyTorch.
name=$(basename "$MODEL")
FIXED="$OUT/fixed-$name"
step recalibrate "${VS[@]}" recalibrate "$MODEL" --data "$DATA" "$@" --exact "${held[@]}" \
    --output "$FIXED" --report "$OUT/recalibrate.html"
step probe "${VS[@]}" probe "$FIXED" --data "$CHECK_DATA" "$@" --fail-above "$FAIL_ABOVE" \
    --report "$OUT/probe.json"
step export "${VS[@]}" export "$FIXED" --data "$DATA" --max-batches 2 "$@" \
    --output "$OUT/model.onnx" --report "$OUT/export.json"
exit "$status"
