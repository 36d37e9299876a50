"""Load test of the OpenAI-compatible server: N concurrent clients × R requests each, at several concurrency
levels, interleaved over rounds; prints errors, completion tokens/s (median over rounds) and latencies.

    python tools/load_test.py --model=WORKDIR_OR_GGUF [--clients=1,8,32] [--requests=4] [--max_tokens=32]
    python tools/load_test.py --url=http://127.0.0.1:8000 --model_id=NAME ...

With --model it starts `python -m gpt_jax.main --mode=serve --config.init_from=MODEL` on a free port of 127.0.0.1
and stops it at the end. Traffic goes to loopback addresses only, and every run is bounded (requests × clients,
--timeout per request). Needs the `serve` extra (`pip install -e '.[serve]'`: httpx, and fastapi and uvicorn for
--model).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse

from absl import flags

from gpt_jax import cli
from gpt_jax.errors import UserError

flags.DEFINE_string("model", None, "serve this workdir / HF directory / GGUF file for the test")
flags.DEFINE_string("url", None, "an already running server (loopback only)")
flags.DEFINE_string("model_id", None, "model id for --url (default: the first of /v1/models)")
flags.DEFINE_string("api_key", os.environ.get("GPT_JAX_API_KEY"), "bearer token (default: env GPT_JAX_API_KEY)")
flags.DEFINE_string("clients", "1,8,32", "comma-separated concurrency levels")
flags.DEFINE_integer("requests", 4, "requests per client")
flags.DEFINE_integer("max_tokens", 32, "completion tokens per request")
flags.DEFINE_float("temperature", 0.8, "sampling temperature")
flags.DEFINE_bool("stream", False, "stream responses (SSE)")
flags.DEFINE_integer("rounds", 3, "repeat the levels, interleaved; medians are shown")
flags.DEFINE_float("timeout", 300.0, "seconds per request")
flags.DEFINE_integer("max_batch", 8, "with --model: the server's cache rows")
flags.DEFINE_integer("max_len", 0, "with --model: the server's context (0: the model's)")
flags.DEFINE_string("json", None, "also write the results here")

PROMPTS = ["ROMEO:", "First Citizen:", "KING HENRY:", "The ", "JULIET:", "Once upon a time", "HAMLET:", "To be"]


def _loopback_only(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"--url must point at a loopback address (127.0.0.0/8, ::1, localhost), not {host}")


async def _client(http, model: str, index: int, requests: int, args, results: list) -> None:
    import httpx

    for j in range(requests):
        body = {"model": model, "prompt": PROMPTS[(index + j) % len(PROMPTS)], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "seed": index * 1000 + j, "stream": args.stream}
        if args.stream:  # the token count comes in a last chunk, when asked for
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        tokens, error = 0, None
        try:
            if args.stream:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}"
                    done = False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                error = chunk["error"]["message"]
                            elif chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                    if not done and error is None:
                        error = "stream ended without [DONE]"
            else:
                r = await http.post("/v1/completions", json=body)
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    tokens = r.json()["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        results.append({"tokens": tokens, "seconds": time.perf_counter() - start, "error": error})


async def run_level(url: str, model: str, clients: int, requests: int, args, headers: dict) -> dict:
    """`clients` concurrent clients, each sending `requests` requests one after another."""
    import httpx

    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, model, i, requests, args, results) for i in range(clients)))
        wall = time.perf_counter() - start
    latencies = sorted(r["seconds"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "first_error": errors[:1],
            "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "latency_p50": latencies[len(latencies) // 2], "latency_p95": latencies[int(len(latencies) * 0.95)]}


def main(argv: list[str]) -> int:
    """Runs the load test the flags describe; prints a table per concurrency level."""
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}")
    args = flags.FLAGS
    if bool(args.model) == bool(args.url):
        raise UserError("give exactly one of --model and --url")
    cli.require("serve", "httpx", *(("fastapi", "uvicorn") if args.model else ()))
    import httpx

    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise UserError(f"--clients={args.clients!r} is not a comma-separated list of integers") from None
    if args.url:
        _loopback_only(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc, workdir = None, tempfile.mkdtemp(prefix="load_test_") if args.model else None
    try:
        if args.model:
            from gpt_jax import serve

            proc, url, log_path = serve.spawn(args.model, workdir, f"--max_batch={args.max_batch}",
                                              f"--max_len={args.max_len}")  # its request log would drown the table
            serve.wait_until_up(proc, url, log_path)
        else:
            url = args.url.rstrip("/")
        try:
            model = args.model_id or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach {url}: {e}") from None
        asyncio.run(run_level(url, model, 1, 1, args, headers))  # warm
        runs: dict[int, list[dict]] = {c: [] for c in levels}
        for _ in range(args.rounds):
            for c in levels:
                runs[c].append(asyncio.run(run_level(url, model, c, args.requests, args, headers)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(r["tokens_per_s"] for r in runs[levels[0]])
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'× ' + str(levels[0]):>6} "
          f"{'p50 s':>7} {'p95 s':>7}")
    summary = []
    for c in levels:
        rs = runs[c]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        row = {"clients": c, "requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs),
               "tokens_per_s": tps, "speedup": tps / base,
               "latency_p50": statistics.median(r["latency_p50"] for r in rs),
               "latency_p95": statistics.median(r["latency_p95"] for r in rs),
               "first_error": next((r["first_error"] for r in rs if r["first_error"]), [])}
        summary.append(row)
        print(f"{c:>7} {row['requests']:>8} {row['errors']:>6} {tps:>9.1f} {row['speedup']:>6.2f} "
              f"{row['latency_p50']:>7.2f} {row['latency_p95']:>7.2f}" +
              (f"  first error: {row['first_error'][0]}" if row["first_error"] else ""))
    if args.json:
        own = {f.name: f.value for f in flags.FLAGS.get_flags_for_module(sys.modules[__name__])}
        with open(args.json, "w") as f:
            json.dump({"args": own, "levels": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    cli.run(main)
