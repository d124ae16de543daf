#!/usr/bin/env bash
# Run openai-python's own API tests (tests/api_resources) against a live `tokenmill serve`.
#
#   scripts/openai_python_tests.sh /path/to/openai-python-checkout [test paths or pytest args...]
#
# Without test paths it runs all of tests/api_resources (6187 tests at openai-python v3.3.1, most for
# endpoints a model server has no business with: files, audio, admin...). The surface tokenmill
# serves is   tests/api_resources/{test_models.py,test_completions.py,chat,test_embeddings.py,
# test_responses.py,responses}   (455 tests at v3.3.1).
#
# The checkout is not fetched here: pass a local clone of github.com/openai/openai-python.
# A separate venv (under $OPENAI_TESTS_VENV, default /tmp/openai-python-tests-venv) gets the SDK
# from the checkout plus its test dependencies (pip only). The server runs from this repo's
# .venv (or $TOKENMILL_PYTHON) on a tiny random-weight model, on 127.0.0.1 and a free port,
# with --store, and serves every model name the tests use as an alias of that model, so that a
# test fails for what the server does, not for a name it was not started with.
# The tests run one at a time (the checkout's addopts ask for xdist's -n auto; overridden).
# The tests read TEST_API_BASE_URL. Prints "passed N failed M skipped K errors E of T".
set -euo pipefail

CHECKOUT=${1:?usage: $0 OPENAI_PYTHON_CHECKOUT [test paths or pytest args...]}
shift
if [ $# -eq 0 ]; then set -- tests/api_resources; fi
CHECKOUT=$(cd "$CHECKOUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${TOKENMILL_PYTHON:-$REPO/.venv/bin/python}
VENV=${OPENAI_TESTS_VENV:-/tmp/openai-python-tests-venv}
WORK=$(mktemp -d /tmp/openai-python-tests.XXXXXX)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# The SDK from the checkout (with aiohttp: the async tests run on both HTTP clients), and what its
# tests import (conftest: pytest-asyncio; tests/utils: dirty-equals, inline-snapshot).
"$VENV/bin/pip" install -q -e "$CHECKOUT[aiohttp]" pytest pytest-asyncio inline-snapshot dirty-equals time-machine \
    >"$WORK/pip.log" 2>&1 || { tail -20 "$WORK/pip.log"; exit 1; }

# Every model="..." name in the tests, served as an alias of the one model.
mapfile -t NAMES < <(grep -rhoE 'model="[^"]+"' "$CHECKOUT/tests/api_resources" | sed -E 's/model="(.*)"/\1/' | sort -u)
MODEL=$("$PY" -c 'from tokenmill.testing.tiny_models import make_tiny_model; print(make_tiny_model("llama"))')
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
STORE=()  # a server without --store (an older tokenmill) is run without it
if "$PY" -m tokenmill serve --help 2>/dev/null | grep -q -- '--store'; then STORE=(--store "$WORK/store.db"); fi
"$PY" -m tokenmill serve "$MODEL" --device cpu --kv-cache-memory 16MiB --max-model-len 512 --port "$PORT" \
    "${STORE[@]}" --served-model-name "${NAMES[@]}" --log-level warning >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 360); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited:"; tail -40 "$WORK/server.log"; exit 1; fi
    sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "server not healthy"; tail -40 "$WORK/server.log"; exit 1; }

cd "$CHECKOUT"
set +e
TEST_API_BASE_URL="http://127.0.0.1:$PORT/v1" timeout 3600 "$VENV/bin/python" -m pytest -q \
    -p no:cacheprovider -o addopts=--tb=line "$@" >"$WORK/pytest.log" 2>&1
set -e
cp "$WORK/pytest.log" "${OPENAI_TESTS_LOG:-/tmp/openai-python-tests.log}"
SUMMARY=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$WORK/pytest.log" | tail -1)
count() { echo "$SUMMARY" | grep -oE "[0-9]+ $1" | grep -oE '[0-9]+' || echo 0; }
P=$(count passed); F=$(count failed); S=$(count skipped); E=$(count error)
echo "passed $P failed $F skipped $S errors $E of $((P + F + S + E))  (summary: $SUMMARY; log: ${OPENAI_TESTS_LOG:-/tmp/openai-python-tests.log})"
