"""Load test of the OpenAI-compatible server: N concurrent clients × R requests each, at several concurrency
levels, interleaved over rounds; prints errors, completion tokens/s (median over rounds) and latencies.

    python tools/load_test.py --model=WORKDIR_OR_GGUF [--clients=1,8,32] [--requests=4] [--max_tokens=32]
    python tools/load_test.py --url=http://127.0.0.1:8000 --model_id=NAME ...

With --model it starts `python -m gpt_jax.serve` on a free port of 127.0.0.1 and stops it at the end. Traffic goes
to loopback addresses only, and every run is bounded (requests × clients, --timeout per request).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["ROMEO:", "First Citizen:", "KING HENRY:", "The ", "JULIET:", "Once upon a time", "HAMLET:", "To be"]


def _loopback_only(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"error: --url must point at a loopback address (127.0.0.0/8, ::1, localhost), not {host}")


async def _client(http: httpx.AsyncClient, model: str, index: int, requests: int, args, results: list) -> None:
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


async def run_level(url: str, model: str, clients: int, args, headers: dict) -> dict:
    """`clients` concurrent clients, each sending `args.requests` requests one after another."""
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, model, i, args.requests, args, results) for i in range(clients)))
        wall = time.perf_counter() - start
    latencies = sorted(r["seconds"] for r in results)
    errors = [r["error"] for r in results if r["error"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "first_error": errors[:1],
            "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "latency_p50": latencies[len(latencies) // 2], "latency_p95": latencies[int(len(latencies) * 0.95)]}


def _start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt_jax.serve", args.model, "--port", str(port), "--max_batch",
           str(args.max_batch), "--log_level", "warning"]
    if args.max_len:
        cmd += ["--max_len", str(args.max_len)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the server did not start in 10 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="serve this workdir / HF directory / GGUF file for the test")
    parser.add_argument("--url", help="an already running server (loopback only)")
    parser.add_argument("--model_id", help="model id for --url (default: the first of /v1/models)")
    parser.add_argument("--api_key", default=os.environ.get("GPT_JAX_API_KEY"))
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--stream", action="store_true", help="stream responses (SSE)")
    parser.add_argument("--rounds", type=int, default=3, help="repeat the levels, interleaved; medians are shown")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--max_batch", type=int, default=8, help="with --model: the server's cache rows")
    parser.add_argument("--max_len", type=int, default=0, help="with --model: the server's context (0: model's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if bool(args.model) == bool(args.url):
        raise SystemExit("error: give exactly one of --model and --url")
    proc = None
    if args.model:
        proc, url = _start_server(args)
    else:
        _loopback_only(args.url)
        url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = args.model_id or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        levels = [int(c) for c in args.clients.split(",")]
        asyncio.run(run_level(url, model, 1, argparse.Namespace(**{**vars(args), "requests": 1}), headers))  # warm
        runs: dict[int, list[dict]] = {c: [] for c in levels}
        for _ in range(args.rounds):
            for c in levels:
                runs[c].append(asyncio.run(run_level(url, model, c, args, headers)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
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
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "levels": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
