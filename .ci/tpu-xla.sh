#!/usr/bin/env bash
# The tpu plugin on a real XLA device without a TPU: torch 2.9 + torch-xla 2.9 with PJRT_DEVICE=CPU,
# in its own virtualenv (~7 GB; reused when it exists), then `tokenmill conformance tpu` with every
# check run (platform, static-shape compile counts, attention, end-to-end greedy parity with HF).
# Not part of .ci/run: building the venv and XLA's compilations take longer than the main CI allows.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TOKENMILL_XLA_VENV:-/work/venv-xla}"
t0=$(date +%s)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch_xla" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # torch-xla 2.9 needs torch 2.9 (constraints.txt pins the main venv's torch, so it is not used here)
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install --progress-bar off "torch==2.9.*" "torch-xla==2.9.*"
fi
torch=$("$venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$torch" > "$venv/constraints.txt"
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q -c "$venv/constraints.txt" pluggy \
  "transformers>=4.45" tokenizers safetensors tqdm jinja2 fastapi uvicorn pydantic prometheus-client httpx \
  "xgrammar>=0.1.25" "outlines-core>=0.2.10" jsonschema pytest
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q --no-deps -e . -e plugins/cpu -e plugins/tpu
t1=$(date +%s)
echo "tpu-xla: venv ready in $((t1 - t0)) s (torch $torch)"
export PJRT_DEVICE=CPU
report="${TOKENMILL_XLA_REPORT:-${TMPDIR:-/tmp}/tokenmill-conformance-tpu.md}"
rc=0
"$venv/bin/tokenmill" conformance tpu --report "$report" || rc=$?
t2=$(date +%s)
echo "tpu-xla: conformance took $((t2 - t1)) s (exit $rc); total $((t2 - t0)) s; report $report"
exit "$rc"
