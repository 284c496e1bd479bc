#!/usr/bin/env bash
# Regenerates docs/img/probe_report.png: a real `varshift probe --report FILE.html` run on the
# shipped sample model, rendered once by headless Chromium (Debian: apt-get install chromium).
# Not run in CI; the PNG is committed. Run from the repository root.
set -euo pipefail
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m varshift probe sample_models/digits_dropout_bn.pt --data sample_models/digits_calib.pt \
    --report "$tmp/probe.html" --quiet
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,1160 \
    --screenshot="$tmp/probe.png" "file://$tmp/probe.html" 2>/dev/null
mv "$tmp/probe.png" docs/img/probe_report.png
echo "wrote docs/img/probe_report.png"
