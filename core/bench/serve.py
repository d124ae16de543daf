"""``tokenmill bench serve``: drive a running OpenAI-compatible server with N concurrent
streaming clients and report throughput and latency per concurrency, side by side.

For each concurrency level, ``--num-requests`` streaming completions (``ignore_eos``, so
each yields ``--max-tokens`` tokens) are sent by that many concurrent clients. Reported:
request throughput, output tokens/s, time to first token and inter-token latency (mean,
p50, p99). A PNG plot of latency against concurrency is written with matplotlib (Agg).
``--launch MODEL`` starts ``tokenmill serve`` for the run and stops it afterwards.
Works against any server that speaks the OpenAI completions API (vLLM, SGLang, ...).

``--against-vllm PYTHON|URL`` (with ``--launch MODEL``) runs the same levels against vLLM-CPU in
the same run (:mod:`tokenmill.bench.side_by_side`). ``--prompt-lens N,N,...`` (with ``--launch``)
sweeps prompt length instead of sending one prompt (:mod:`tokenmill.bench.prompt_lens`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import hashlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

DEFAULT_PROMPT = (
    "The Python language reference describes the exact syntax and semantics of the language. "
    "It is terse, but attempts to be exact and complete. The semantics of non-essential built-in "
    "object types and of the built-in functions and modules are described in the library reference. "
    "Write a short explanation of how the interpreter evaluates an expression statement:"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (without /v1)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--num-requests", type=int, default=64, help="requests per concurrency level")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-text", default=None, help="the prompt every request sends")
    src.add_argument("--workload", default=None, help="a workload JSON (shared W): its serve_text is the prompt")
    src.add_argument("--prompt-lens", default=None, metavar="N,N,...",
                     help="sweep prompt length (with --launch): at each length, every concurrency level sends its own "
                          "distinct prompts of exactly N tokens of the model's tokenizer (TTFT and ITL against length)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (by default every request yields --max-tokens tokens)")
    p.add_argument("--api-key", default=None, help="bearer key (default: $TOKENMILL_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--plot", default="bench_serve.png", help="PNG of latency against concurrency ('' to skip)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON")
    p.add_argument("--launch", default=None, metavar="MODEL",
                   help="start `tokenmill serve MODEL` on a free port for the run ('default' = bundled model)")
    p.add_argument("--launch-args", default="", help="extra flags for the launched server, as one string")
    p.add_argument("--against-vllm", default=None, metavar="PYTHON|URL",
                   help="also run vLLM-CPU (its server started with this interpreter on the --launch model, or "
                        "already serving at this URL) in the same run and report tokenmill/vLLM ratios")
    p.add_argument("--pairs", type=int, default=1,
                   help="with --against-vllm: rounds of tokenmill-then-vLLM (the servers take turns)")
    p.add_argument("--dtype", default="float32",
                   help="with --against-vllm: the dtype vLLM serves the model in; with --prompt-lens: the dtype of the "
                        "matmul limit the prefill times are set against")


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(values: list[float]) -> float:
    """The mean (nan of nothing)."""
    return sum(values) / len(values) if values else float("nan")


async def _one(session, url: str, body: dict, timeout: float) -> RequestResult:
    import aiohttp

    t0 = time.perf_counter()
    first = last = None
    itl: list[float] = []
    chunks, usage_tokens = 0, None
    pieces: list[str] = []
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {resp.status}: {text[:200]}")
            async for raw in resp.content:  # one SSE line at a time
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return RequestResult(False, error=str(obj["error"])[:200])
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                choices = obj.get("choices") or []
                if not any(c.get("text") for c in choices):
                    continue
                pieces.extend(c.get("text") or "" for c in choices)
                now = time.perf_counter()
                chunks += 1
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
    except Exception as exc:  # network errors count as failed requests
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no tokens received")
    return RequestResult(True, first - t0, end - t0, usage_tokens if usage_tokens is not None else chunks, itl,
                         text="".join(pieces))


async def _level(base: str, headers: dict, bodies: list[dict], warm: list[dict], concurrency: int,
                 timeout: float) -> dict:
    """``bodies`` (one request each, in order) sent by ``concurrency`` clients after the untimed ``warm`` requests
    (sent at once)."""
    # aiohttp rather than httpx: the client shares the host's cores with the server it measures, and
    # per streamed token it used 0.07 ms of CPU against httpx's 0.16-0.19 (2 cores, 8 streams).
    import aiohttp

    url = base + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as client:
        await asyncio.gather(*(_one(client, url, w, timeout) for w in warm))  # warm the connections
        todo = list(reversed(bodies))
        results: list[RequestResult] = []

        async def worker():
            while todo:
                body = todo.pop()
                results.append(await _one(client, url, body, timeout))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    ttft = [r.ttft for r in good]
    itl = [x for r in good for x in r.itl]
    out_tokens = sum(r.output_tokens for r in good)
    return {
        "concurrency": concurrency, "requests": len(results), "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:3], "duration_s": duration,
        "request_throughput": len(good) / duration, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration,
        "ttft_mean_ms": 1e3 * mean(ttft), "ttft_p50_ms": 1e3 * _pct(ttft, 0.5), "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
        "itl_mean_ms": 1e3 * mean(itl), "itl_p50_ms": 1e3 * _pct(itl, 0.5), "itl_p99_ms": 1e3 * _pct(itl, 0.99),
        # the set of greedy completions: equal sets from two engines given the same prompts = the same work
        "outputs": sorted({hashlib.sha1(r.text.encode()).hexdigest()[:12] for r in good}),
    }


def format_table(results: list[dict]) -> str:
    cols = [("concurrency", "conc", "{:d}"), ("requests", "reqs", "{:d}"), ("failed", "failed", "{:d}"),
            ("request_throughput", "req/s", "{:.2f}"), ("output_tok_s", "out tok/s", "{:,.1f}"),
            ("ttft_mean_ms", "TTFT mean", "{:.1f}"), ("ttft_p50_ms", "TTFT p50", "{:.1f}"),
            ("ttft_p99_ms", "TTFT p99", "{:.1f}"), ("itl_mean_ms", "ITL mean", "{:.2f}"),
            ("itl_p50_ms", "ITL p50", "{:.2f}"), ("itl_p99_ms", "ITL p99", "{:.2f}")]
    rows = [[h for _, h, _ in cols]] + [[f.format(r[k]) for k, _, f in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(latencies in ms)"


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric, label in ((axes[0], "ttft", "time to first token (ms)"),
                              (axes[1], "itl", "inter-token latency (ms)")):
        for stat, style in (("mean", "o-"), ("p50", "s--"), ("p99", "^:")):
            ax.plot(conc, [r[f"{metric}_{stat}_ms"] for r in results], style, label=stat)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.legend()
    axes[2].plot(conc, [r["output_tok_s"] for r in results], "o-")
    axes[2].set_xlabel("concurrency")
    axes[2].set_ylabel("output tokens/s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def launch_server(args, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start ``tokenmill serve`` (``--launch``, ``--launch-args``, then ``extra``) on a free port; the process and
    its URL once healthy."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = [] if args.launch == "default" else [args.launch]
    cmd = [sys.executable, "-m", "tokenmill", "serve", *model, "--port", str(port), "--log-level", "warning",
           *shlex.split(args.launch_args), *extra]
    print(f"launching: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the launched server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the launched server did not become healthy within 600 s")


def launched_checkpoint(args) -> str:
    """The checkpoint directory ``--launch`` serves (``default``: the bundled model's)."""
    if args.launch == "default":
        from tokenmill.default_model import DEFAULT_MODEL_DIR

        return str(DEFAULT_MODEL_DIR)
    return os.path.abspath(args.launch)


def prompt_text(args) -> str:
    """The prompt every request sends: ``--prompt-text``, a workload's ``serve_text``, or the default."""
    prompt = args.prompt_text or DEFAULT_PROMPT
    if args.workload:
        with open(args.workload) as f:
            prompt = json.load(f).get("serve_text") or ""
        if not prompt:
            raise ValueError(f"workload {args.workload} has no serve_text")
    return prompt


def stop_server(proc: subprocess.Popen | None) -> None:
    """Interrupt a launched server and wait for it (killed after 30 s); None is nothing to stop."""
    if proc is None:
        return
    proc.send_signal(2)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def served_model(base: str, headers: dict, model: str | None) -> str:
    """``model``, or the first model the server lists."""
    import httpx

    if model is not None:
        return model
    resp = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def request_body(model: str, prompt, args) -> dict:
    """A greedy streaming completion of ``prompt`` (text or token ids), ``--max-tokens`` long."""
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def measure(base: str, headers: dict, model: str | None, prompt: str, levels: list[int], args) -> tuple[str, list]:
    """Every concurrency level against one server; returns the model name asked for and one dict per level."""
    model = served_model(base, headers, model)
    body = request_body(model, prompt, args)
    results = []
    for c in levels:
        print(f"concurrency {c}: {args.num_requests} requests ...", file=sys.stderr, flush=True)
        r = asyncio.run(_level(base, headers, [body] * args.num_requests,
                               [{**body, "max_tokens": min(8, args.max_tokens)}], c, args.timeout))
        results.append(r)
        print(f"  {r['output_tok_s']:,.1f} output tok/s, TTFT p50 {r['ttft_p50_ms']:.1f} ms, "
              f"ITL mean {r['itl_mean_ms']:.2f} ms, {r['failed']} failed {r['errors'] or ''}",
              file=sys.stderr, flush=True)
    return model, results


def auth_headers(args) -> dict:
    """The bearer header of ``--api-key`` (or ``$TOKENMILL_API_KEY`` / ``$OPENAI_API_KEY``), if any."""
    key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def run(args) -> int:
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1 or args.num_requests < 1:
        raise ValueError("--concurrency levels and --num-requests must be positive")
    if not 1 <= args.pairs <= 20:
        raise ValueError(f"--pairs must be in [1, 20], got {args.pairs}")
    cases = None
    if args.prompt_lens is not None:
        from tokenmill.bench import prompt_lens

        cases = prompt_lens.cases_for(args, levels)
    if args.against_vllm:
        from tokenmill.bench.side_by_side import run_side_by_side

        return run_side_by_side(args, levels, cases)
    if cases is not None:
        return prompt_lens.run_alone(args, cases)
    prompt = prompt_text(args)
    proc = None
    base = args.base_url.rstrip("/").removesuffix("/v1")
    if args.launch:
        proc, base = launch_server(args)
    try:
        model, results = measure(base, auth_headers(args), args.model, prompt, levels, args)
    finally:
        stop_server(proc)
    print(f"\nserver {base}, model {model}, {args.num_requests} streaming requests per level, "
          f"max_tokens {args.max_tokens}")
    print(format_table(results))
    if args.plot:
        plot(results, args.plot, f"{model} @ {base}: {args.max_tokens} output tokens")
        print(f"plot: {args.plot}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r["failed"] for r in results) else 0
