"""vLLM-CPU as a peer in side-by-side benchmarks (``--against-vllm PYTHON|URL``).

vLLM lives in its own environment (its torch pins differ from ours), so it is driven
through that environment's interpreter: offline runs execute :data:`OFFLINE_WORKER` there
and read one JSON line back; serving runs start its OpenAI server there on a free port (or
use a server already running at a URL). :func:`vllm_env` gives it its best CPU setup: every
core this process may use bound to its OpenMP threads, none reserved, and the tcmalloc and
Intel OpenMP preloads it recommends when they are installed in its environment or the system.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import re
import urllib.request

#: vLLM's KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB); side-by-side serving gives tokenmill the same budget.
KV_GIB = 2
#: The context vLLM's server is started with (``--max-model-len``).
SERVER_MAX_MODEL_LEN = 2048

#: Runs in vLLM's interpreter: argv = model, workload JSON, dtype, num_prompts (0: all), output file.
OFFLINE_WORKER = r"""
import hashlib, json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, wpath, dtype, num, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
w = json.load(open(wpath))
prompts = w["prompts"] if not num else [w["prompts"][i % len(w["prompts"])] for i in range(num)]
max_tokens = int(w.get("max_tokens", 128))
llm = LLM(model=model, dtype=dtype, max_model_len=2048, max_num_seqs=256)
greedy = dict(temperature=0, ignore_eos=True)
llm.generate([TokensPrompt(prompt_token_ids=p) for p in w.get("warm", [])] or [TokensPrompt(prompt_token_ids=prompts[0])],
             SamplingParams(max_tokens=8, **greedy), use_tqdm=False)
t0 = time.perf_counter()
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=max_tokens, **greedy),
                    use_tqdm=False)
dt = time.perf_counter() - t0
toks = [list(o.outputs[0].token_ids) for o in outs]
n = sum(map(len, toks))
json.dump({"engine": "vllm", "prompts": len(prompts), "output_tokens": n, "seconds": dt, "output_tok_s": n / dt,
           "first_tokens": toks[0][:8], "outputs_sha": hashlib.sha1(json.dumps(toks).encode()).hexdigest()[:12]},
          open(out, "w"))
"""


#: Runs in vLLM's interpreter: argv = model, dtype, batch sizes (comma list), prompt len, decode steps, seed,
#: vocab size, output file. Per batch size: the wall time of prefilling B prompts (max_tokens=1), and the
#: time per decode step from the difference with a run that also decodes ``steps`` more tokens.
STEP_WORKER = r"""
import json, random, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, dtype, sizes, plen, steps, seed, vocab, out = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")], \
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
llm = LLM(model=model, dtype=dtype, max_model_len=2048, max_num_seqs=max(256, max(sizes)), enable_prefix_caching=False)
res = []
for b in sizes:
    rng = random.Random(seed + b)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(plen)]) for _ in range(b)]
    def timed(n):
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0
    timed(2)  # warm this batch size
    prefill = timed(1)
    both = timed(1 + steps)
    res.append({"batch": b, "prefill_ms": 1e3 * prefill, "decode_step_ms": 1e3 * max(0.0, both - prefill) / steps})
json.dump(res, open(out, "w"))
"""


def run_steps(python: str, model: str, dtype: str, sizes: list[int], prompt_len: int, steps: int, seed: int,
              vocab: int, timeout: float = 1800) -> list[dict]:
    """vLLM's prefill time and time per decode step at each batch size, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        proc = subprocess.run([python, "-c", STEP_WORKER, model, dtype, ",".join(map(str, sizes)), str(prompt_len),
                               str(steps), str(seed), str(vocab), out],
                              capture_output=True, text=True, env=vllm_env(python), timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"vLLM step run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _preloads(python: str) -> list[str]:
    """tcmalloc and Intel OpenMP shared objects found in vLLM's environment or the system."""
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    found = []
    for pattern in ("libtcmalloc_minimal.so*", "libtcmalloc.so*", "libiomp5.so"):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", pattern)) +
                      glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "*", pattern)) +
                      glob.glob(os.path.join("/usr/lib", "*-linux-gnu", pattern)))
        if hits and not any(os.path.basename(h).startswith(pattern.split(".so")[0]) for h in found):
            found.append(hits[0])
    return found


def vllm_env(python: str, kv_gib: int = KV_GIB) -> dict:
    """Environment for vLLM-CPU: all usable cores bound, none reserved, preloads where installed."""
    env = dict(os.environ)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(int(kv_gib)),
               VLLM_CPU_OMP_THREADS_BIND=f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1))
               else ",".join(map(str, cpus)), VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    env.pop("OMP_NUM_THREADS", None)
    pre = _preloads(python)
    if pre:
        env["LD_PRELOAD"] = ":".join(pre + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    return env


def run_offline(python: str, model: str, workload: str, dtype: str, num_prompts: int = 0,
                timeout: float = 1800) -> dict:
    """One offline run of vLLM on ``workload`` (a W-format JSON) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = vllm_env(python)
        proc = subprocess.run([python, "-c", OFFLINE_WORKER, model, workload, dtype, str(num_prompts), out],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"vLLM offline run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            result = json.load(f)
    result["preloads"] = env.get("LD_PRELOAD", "")
    result["threads_bind"] = env["VLLM_CPU_OMP_THREADS_BIND"]
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Poll ``base_url/v1/models`` until it answers 200 (or the process dies / time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base_url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server at {base_url} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def vllm_server(target: str, model: str, dtype: str, timeout: float = 300, log_path: str | None = None):
    """Yield the base URL of a vLLM server: ``target`` itself if a URL, else one started with that python."""
    if is_url(target):
        yield target.rstrip("/").removesuffix("/v1")
        return
    port = _free_port()
    cmd = [target, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", dtype,
           "--max-model-len", str(SERVER_MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(cmd, env=vllm_env(target), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def logged_kv_tokens(log_text: str) -> int | None:
    """The KV cache size in tokens vLLM logs at start-up (``CPU KV cache size: 131,072 tokens``), if found."""
    m = re.search(r"KV cache size: ([\d,]+) tokens", log_text)
    return int(m.group(1).replace(",", "")) if m else None


def served_model_name(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


if __name__ == "__main__":  # pragma: no cover - manual check: python -m tokenmill.bench.vllm_peer PYTHON
    print(json.dumps(vllm_env(sys.argv[1]), indent=1))
