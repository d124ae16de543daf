#!/usr/bin/env bash
# The cpu plugin's intel-extension-for-pytorch (IPEX) path: torch 2.8 + IPEX 2.8 (IPEX runs only on
# the torch major.minor it was built for) in its own virtualenv (~7 GB; reused when it exists), then
# `tokenmill conformance cpu` with every check run (platform, IPEX's RMSNorm against the reference,
# IPEX's paged attention against the reference attention, end-to-end greedy parity with HF), and
# `tokenmill conformance xpu` (no Intel GPU here: its platform checks say so and skip).
# Not part of .ci/run: the venv alone is larger than the main CI's whole install.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TOKENMILL_IPEX_VENV:-/work/venvs/ipex}"
t0=$(date +%s)
pip_() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" "$@"; }
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import importlib.util as u; assert u.find_spec('intel_extension_for_pytorch')" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # IPEX 2.8 needs torch 2.8 (constraints.txt pins the main venv's torch, so it is not used here)
  pip_ install --progress-bar off "torch==2.8.*" "intel-extension-for-pytorch==2.8.*"
fi
torch=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$torch" > "$venv/constraints.txt"
# transformers<5: IPEX 2.8 imports transformers.modeling_attn_mask_utils (gone in 5) when it is imported
pip_ install -q -c "$venv/constraints.txt" pluggy "transformers>=4.45,<5" tokenizers safetensors tqdm jinja2 \
  fastapi uvicorn pydantic prometheus-client httpx "xgrammar>=0.1.25" "outlines-core>=0.2.10" jsonschema pytest
pip_ install -q --no-deps -e . -e plugins/cpu -e plugins/xpu
t1=$(date +%s)
echo "ipex: venv ready in $((t1 - t0)) s (torch $torch, $("$venv/bin/python" -c "from importlib import metadata as m; print('intel-extension-for-pytorch', m.version('intel-extension-for-pytorch'))"))"
dir="${TOKENMILL_IPEX_REPORTS:-${TMPDIR:-/tmp}}"
rc=0
"$venv/bin/tokenmill" conformance cpu --report "$dir/tokenmill-conformance-cpu-ipex.md" || rc=$?
t2=$(date +%s)
echo "ipex: cpu conformance took $((t2 - t1)) s (exit $rc); report $dir/tokenmill-conformance-cpu-ipex.md"
"$venv/bin/tokenmill" conformance xpu --report "$dir/tokenmill-conformance-xpu-ipex.md" || rc=$?
t3=$(date +%s)
echo "ipex: xpu conformance took $((t3 - t2)) s; total $((t3 - t0)) s (exit $rc)"
exit "$rc"
