"""`bench serve --prompt-lens`: argument checks, exact-length distinct prompts, the table, plot and KV lines."""
from __future__ import annotations

import argparse
import http.server
import threading

import pytest

from tokenmill.bench import prompt_lens, serve, side_by_side, vllm_peer
from tokenmill.bench.limits import ModelShapes, prefill_seconds
from tokenmill.bench.prompt_lens import KEY_TOKENS, PromptSource, build_cases, length_table, parse_lengths
from tokenmill.testing.tiny_models import make_tiny_model


def test_parse_lengths_accepts_and_bounds():
    assert parse_lengths("128, 256,2016", 32, 2048) == [128, 256, 2016]
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_lengths("128,abc", 32, 2048)
    with pytest.raises(ValueError, match="repeats"):
        parse_lengths("128,128", 32, 2048)
    with pytest.raises(ValueError, match="at least"):
        parse_lengths("4,128", 32, 2048)
    with pytest.raises(ValueError, match="1 to"):
        parse_lengths(" , ", 32, 2048)
    with pytest.raises(ValueError, match="longest prompt that fits is 2016"):
        parse_lengths("1024,2048", 32, 2048)


def _serve_args(*argv: str):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_refuses_prompt_lens_without_launch_or_past_the_context():
    with pytest.raises(ValueError, match="needs --launch"):
        serve.run(_serve_args("--prompt-lens", "128,256"))
    model = str(make_tiny_model("llama"))  # max_position_embeddings 512
    with pytest.raises(ValueError, match="longest prompt that fits is 480"):
        serve.run(_serve_args("--launch", model, "--prompt-lens", "128,500", "--max-tokens", "32"))
    with pytest.raises(SystemExit):  # one prompt source at a time
        _serve_args("--prompt-lens", "128", "--prompt-text", "hi")


def test_vllm_context_caps_the_lengths(tmp_path):
    model = make_tiny_model("llama", max_position_embeddings=4096)
    assert prompt_lens.max_context(str(model), None) == 4096
    assert prompt_lens.max_context(str(model), "/some/python") == vllm_peer.SERVER_MAX_MODEL_LEN
    assert prompt_lens.max_context(str(model), "http://127.0.0.1:1") == 4096  # a running server: its own check


def test_prompts_have_the_exact_length_and_never_share_a_start():
    ids = list(range(10, 400))
    src = PromptSource(ids, bos=1, stride=7)
    cases = build_cases(src, [16, 64, 200], [1, 4], 5)
    assert [(c["prompt_len"], c["concurrency"]) for c in cases] == [(16, 1), (16, 4), (64, 1), (64, 4), (200, 1), (200, 4)]
    prompts = [p for c in cases for p in (*c["warm"], *c["prompts"])]
    assert [len(c["warm"]) for c in cases] == [1, 4] * 3 and len(prompts) == 3 * (1 + 4) + 6 * 5
    for c in cases:
        assert all(len(p) == c["prompt_len"] and p[0] == 1 for p in (*c["warm"], *c["prompts"]))
        assert all(p[1:] == ids[p[1] - 10:p[1] - 10 + len(p) - 1] for p in c["prompts"])  # windows of the corpus
    assert len({tuple(p[:KEY_TOKENS]) for p in prompts}) == len(prompts)


def test_repeated_text_is_skipped_and_exhaustion_is_an_error():
    ids = [5, 6, 7, 8] * 10 + list(range(100, 140))  # the repeating part has only 4 distinct starts
    src = PromptSource(ids, bos=None, stride=4)
    got = [src.take(12) for _ in range(4)]
    assert len({tuple(p[:KEY_TOKENS]) for p in got}) == 4
    with pytest.raises(ValueError, match="too few"):
        src.take(len(ids) + 1)
    small = PromptSource(list(range(20)), bos=None)
    for _ in range(20 - 10 + 1):
        small.take(10)
    with pytest.raises(ValueError, match="no 10-token window left"):
        small.take(10)


def test_prompts_from_the_model_tokenizer_are_exact():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tiny_model("llama")), local_files_only=True)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    src = PromptSource(ids, tok.bos_token_id)
    for n in (8, 33, 100):
        p = src.take(n)
        assert len(p) == n and p[0] == tok.bos_token_id
        assert any(ids[o:o + n - 1] == p[1:] for o in range(len(ids)))  # a window of the tokenized text


def _case(n, c, p50, p99, itl, digest="a"):
    return {"prompt_len": n, "concurrency": c, "ttft_p50_ms": p50, "ttft_p99_ms": p99, "itl_mean_ms": itl,
            "outputs": [digest], "requests": 8, "failed": 0}


def test_table_gives_ratios_and_flags_different_outputs():
    runs = {"tokenmill": [[_case(128, 1, 20.0, 30.0, 9.0), _case(2016, 1, 400.0, 500.0, 12.0)]],
            "vllm": [[_case(128, 1, 40.0, 60.0, 10.0), _case(2016, 1, 200.0, 250.0, 12.0)]]}
    table, same = length_table(runs)
    assert same and "| 128 | 1 | 20 | 40 | 0.50x | 30 | 60 | 0.50x | 9.0 | 10.0 | 0.90x |" in table
    assert "| 2016 | 1 | 400 | 200 | 2.00x |" in table and "identical" in table
    runs["vllm"][0][1]["outputs"] = ["b"]
    table, same = length_table(runs)
    assert not same and "differ" in table
    alone, same = length_table({"tokenmill": [[_case(128, 4, 20.0, 30.0, 9.0)], [_case(128, 4, 22.0, 34.0, 9.5)]]})
    assert same and "| 128 | 4 | 20 / 22 | 30 / 34 | 9.0 / 9.5 |" in alone and "ratio" not in alone


def test_plot_is_written(tmp_path):
    runs = {e: [[_case(n, c, n / 10 * k, n / 5 * k, 8.0 * k) for n in (128, 512, 2016) for c in (1, 4)]]
            for e, k in (("tokenmill", 1.0), ("vllm", 1.3))}
    path = tmp_path / "lens.png"
    prompt_lens.plot_lengths(runs, str(path), "synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefill_limit_and_shares():
    shapes = ModelShapes(((4, 8),), 2, (4, 16), 1, 4)  # 128 FLOPs per prompt token, 128 for the LM head
    assert prefill_seconds(shapes, 10, 1.0) == pytest.approx((10 * 128 + 128) / 1e9)
    runs = {"tokenmill": [[_case(1000, 1, 0.258, 1.0, 1.0), _case(1000, 4, 9.0, 9.0, 1.0)]],
            "vllm": [[_case(1000, 1, 0.516, 1.0, 1.0), _case(1000, 4, 9.0, 9.0, 1.0)]]}
    lines = prompt_lens.limit_lines(shapes, 0.5, "F.linear", runs)  # limit (128,000 + 128) / 0.5e9 s = 0.256 ms
    assert len(lines) == 2  # header + the concurrency-1 case only
    assert "limit 0.3 ms" in lines[1] and "tokenmill TTFT p50 0 ms = 99% of it" in lines[1] and "= 50% of it" in lines[1]


def test_kv_lines_check_each_engines_pool_against_the_config():
    model = str(make_tiny_model("llama"))
    shapes = ModelShapes.from_checkpoint(model)
    per = shapes.kv_bytes_per_token(4)
    budget = vllm_peer.KV_GIB << 30
    lines = side_by_side.kv_lines(model, "float32", budget // per, budget // (2 * per))
    assert f"{per:,} bytes from config.json" in lines[0]
    assert "tokenmill" in lines[1] and "matches" in lines[1]
    assert "vLLM" in lines[2] and "DIFFERS" in lines[2]
    assert len(side_by_side.kv_lines(model, "float32", None, None)) == 1


def test_kv_budget_goes_to_tokenmill_unless_the_launch_args_size_it():
    assert side_by_side.kv_budget_args(_serve_args()) == ("--kv-cache-memory", f"{vllm_peer.KV_GIB}GiB")
    assert side_by_side.kv_budget_args(_serve_args("--launch-args=--kv-cache-memory=1GiB")) == ()
    assert side_by_side.kv_budget_args(_serve_args("--launch-args=--num-kv-blocks 64 --dtype float32")) == ()


def test_vllm_log_line_is_read():
    log = "(EngineCore pid=1) INFO 12-03 [kv_cache_utils.py:2328] CPU KV cache size: 131,072 tokens, Maximum ..."
    assert vllm_peer.logged_kv_tokens(log) == 131072
    assert vllm_peer.logged_kv_tokens("nothing here") is None


def test_prefix_cache_counters_of_either_engine():
    body = ("# HELP x\n"
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 32.0\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 4096.0\n'
            'vllm:external_prefix_cache_hits_total{engine="0"} 7.0\n').encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert prompt_lens.prefix_cache_counters(f"http://127.0.0.1:{srv.server_port}") == (32.0, 4096.0)
        body = b"other_metric 1\n"
        assert prompt_lens.prefix_cache_counters(f"http://127.0.0.1:{srv.server_port}") is None
    finally:
        srv.shutdown()
        srv.server_close()
    assert prompt_lens.prefix_cache_counters("http://127.0.0.1:1") is None
