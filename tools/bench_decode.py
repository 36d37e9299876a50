"""Decode speed of gpt_jax against llama.cpp and transformers, side by side in one run, on the same GGUF and the
same prompts: greedy, a fixed number of new tokens, batch 1 and 8, per weight format.

    python tools/bench_decode.py [--model=~/.cache/gpt_jax/SmolLM2-135M-Instruct.Q4_1.gguf] [--batch=1,8]
        [--new_tokens=64] [--rounds=3] [--formats=float32,bfloat16,int8] [--via=server,engine]
        [--llama_cpp=DIR] [--llama_cpp_threads=2] [--torch_threads=1] [--json=FILE]

gpt_jax runs once per weight format (`--config.model.param_dtype`, `--config.model.quantize`), through the HTTP
server (`python -m gpt_jax.main --mode=serve --config.init_from=GGUF`, streamed completions, one client thread per
stream) and/or its engine in this process. Its peers: llama.cpp's `llama-bench` (batch 1) and
`llama-batched-bench` (batch > 1, aggregate) on the same GGUF re-quantized by `llama-quantize` to F32, BF16 and
Q8_0 (the peers of float32, bfloat16 and int8), when `--llama_cpp` names the folder with those binaries; and
transformers' `generate` in float32 (`--torch_threads=` empty skips it).

Every stream generates exactly the N new tokens, past the model's end token (the server's `ignore_eos`), as
llama.cpp's benches and the engine in process do. Decode tokens/s counts the tokens after the first: through the
server, (tokens − 1) / (last token's time − first token's time) per stream, summed over the streams of a batch
over the span from the earliest first token to the latest last one; in process, batch × (N − 1) / (time for N
tokens − time for 1). Prompt processing is reported apart as time to first token. Implementations and batch sizes
are interleaved within each round; medians over rounds are shown, since timings on a shared machine swing.
llama.cpp's two threads slow down sharply when anything else runs: compare on a quiet machine.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from gpt_jax import cli
from gpt_jax.config import cached
from gpt_jax.errors import UserError

flags.DEFINE_string("model", cached("SmolLM2-135M-Instruct.Q4_1.gguf"), "a .gguf file")
flags.DEFINE_string("batch", "1,8", "comma-separated batch sizes (concurrent streams)")
flags.DEFINE_integer("new_tokens", 64, "tokens generated per prompt")
flags.DEFINE_integer("rounds", 3, "interleaved rounds; medians are shown")
flags.DEFINE_string("formats", "float32,bfloat16,int8", "gpt_jax weight formats: float32, bfloat16, int8 "
                    "(float32 elsewhere), bf16_int8 (bfloat16 elsewhere)")
flags.DEFINE_string("via", "server", "how gpt_jax is measured: server (HTTP, streamed), engine (in process), both "
                    "comma-separated")
flags.DEFINE_string("llama_cpp", None, "a folder with llama-bench, llama-batched-bench and llama-quantize")
flags.DEFINE_integer("llama_cpp_threads", 2, "llama.cpp threads")
flags.DEFINE_string("llama_cpp_models", None, "where the re-quantized GGUF files go (default: a temporary folder)")
flags.DEFINE_string("torch_threads", "", "transformers peer: torch thread counts, comma-separated (empty: skip)")
flags.DEFINE_integer("quality_chars", 20000, "quality check: characters of the bundled tinyshakespeare scored per "
                     "format (0: skip the quality check)")
flags.DEFINE_string("json", None, "also write the results here")
PROMPTS = ["The capital of France is", "Once upon a time, there was", "The best way to learn programming is",
           "In 1969, the first humans", "My favourite recipe for soup", "The weather today looks",
           "Water boils at a temperature of", "A good night's sleep helps"]
# gpt_jax format → (param_dtype, quantize, the llama.cpp type that stores the same precision)
FORMATS = {"float32": ("float32", "none", "F32"), "bfloat16": ("bfloat16", "none", "BF16"),
           "int8": ("float32", "int8", "Q8_0"), "bf16_int8": ("bfloat16", "int8", "Q8_0")}


class Engine:
    """gpt_jax's engine in this process; a batch is `batch` requests submitted at once."""

    def __init__(self, source: str, fmt: str, max_batch: int):
        from gpt_jax import decode, workdir

        self.name, self.peer = f"gpt_jax engine {fmt}", FORMATS[fmt][2]
        self.decode = decode
        loaded = workdir.load(source, FORMATS[fmt][:2])
        self.tokenizer = loaded.tokenizer
        self.engine = decode.Engine(loaded.model, loaded.model_cfg, max_batch=max_batch, max_len=512)

    def warm(self, batches: list[int], n: int) -> None:
        for b in batches:
            self.run(b, 1)
            self.run(b, n)

    def run(self, batch: int, n: int) -> dict:
        """{decode tokens/s, first-token seconds, tokens}: times for N tokens and for 1 token, in this call."""
        prompts = [list(self.tokenizer.encode(PROMPTS[i % len(PROMPTS)])) for i in range(batch)]

        def once(tokens: int) -> float:
            start = time.perf_counter()
            states = [self.engine.submit(self.decode.Request(p, max_tokens=tokens,
                                                             sampling=self.decode.SamplingParams(0.0)))
                      for p in prompts]
            self.engine.run_until_done()
            self.last = [s.token_ids for s in states]
            return time.perf_counter() - start

        t1, tn = once(1), once(n)
        return {"decode": batch * (n - 1) / max(tn - t1, 1e-9), "first": t1, "tokens": batch * n}


class Server:
    """`python -m gpt_jax.main --mode=serve` with one weight format, queried with streamed completions."""

    def __init__(self, source: str, fmt: str, max_batch: int):
        import httpx

        from gpt_jax import serve

        # one client for every request, its connections kept alive as a real client's are (a new connection,
        # with httpx's setup, costs ~20 ms: measured against the server's /health)
        self.client, self.serve = httpx.Client(timeout=600), serve
        self.name, self.peer = f"gpt_jax server {fmt}", FORMATS[fmt][2]
        param_dtype, quantize, _ = FORMATS[fmt]
        self.proc, self.url, self.log = serve.spawn(source, tempfile.mkdtemp(), f"--max_batch={max_batch}",
                                                    f"--config.model.param_dtype={param_dtype}",
                                                    f"--config.model.quantize={quantize}")

    def wait_ready(self) -> None:
        self.serve.wait_until_up(self.proc, self.url, self.log, timeout=900)
        self.model = self.client.get(self.url + "/v1/models").json()["data"][0]["id"]

    def warm(self, batches: list[int], n: int) -> None:
        for b in batches:
            self.run(b, n)

    def _stream(self, prompt: str, n: int) -> tuple[float, float, float, int]:
        """(request sent, first token, last token) times and the tokens generated, for one streamed completion."""
        sent = time.perf_counter()
        first = last = None
        tokens = 0
        body = {"model": self.model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        with self.client.stream("POST", self.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {r.status_code} {r.read().decode()[:500]}")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    first = first or now
                    last = now
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return sent, first, last, tokens

    def run(self, batch: int, n: int) -> dict:
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:
            streams = list(pool.map(lambda i: self._stream(PROMPTS[i % len(PROMPTS)], n), range(batch)))
        after_first = sum(tokens - 1 for _, _, _, tokens in streams)
        span = max(last for _, _, last, _ in streams) - min(first for _, first, _, _ in streams)
        return {"decode": after_first / max(span, 1e-9), "first": statistics.median(f - s for s, f, _, _ in streams),
                "tokens": sum(tokens for *_, tokens in streams)}

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


class LlamaCpp:
    """llama.cpp on the GGUF re-quantized to `qtype`: llama-bench for batch 1, llama-batched-bench above."""

    def __init__(self, folder: str, source: str, qtype: str, threads: int, models: str):
        self.folder, self.threads = folder, threads
        self.name = self.peer = f"llama.cpp {qtype}"
        self.path = os.path.join(models, f"{os.path.splitext(os.path.basename(source))[0]}.{qtype}.gguf")
        if not os.path.exists(self.path):
            subprocess.run([self._bin("llama-quantize"), "--allow-requantize", source, self.path, qtype],
                           check=True, capture_output=True)

    def _bin(self, name: str) -> str:
        for candidate in (os.path.join(self.folder, name), os.path.join(self.folder, "bin", name)):
            if os.path.isfile(candidate):
                return candidate
        raise UserError(f"--llama_cpp {self.folder} has no {name}")

    def warm(self, batches: list[int], n: int) -> None:
        self.run(1, 4)

    def run(self, batch: int, n: int) -> dict:
        if batch == 1:
            out = subprocess.run([self._bin("llama-bench"), "-m", self.path, "-p", "16", "-n", str(n), "-t",
                                  str(self.threads), "-r", "1", "-o", "json"], check=True, capture_output=True,
                                 text=True).stdout
            rows = json.loads(out)
            tg = next(r for r in rows if r["n_gen"] > 0)
            pp = next(r for r in rows if r["n_prompt"] > 0)
            return {"decode": tg["avg_ts"], "first": 16 / pp["avg_ts"], "tokens": n}
        out = subprocess.run([self._bin("llama-batched-bench"), "-m", self.path, "-c", str(batch * (16 + n) + 64),
                              "-b", "2048", "-ub", "512", "-npp", "16", "-ntg", str(n), "-npl", str(batch), "-t",
                              str(self.threads), "--output-format", "jsonl"], check=True, capture_output=True,
                             text=True).stdout
        row = next(json.loads(line) for line in out.splitlines() if line.startswith("{"))
        return {"decode": row["speed_tg"], "first": row["t_pp"], "tokens": batch * n}


class Transformers:
    """transformers' `generate` in float32, with torch limited to `threads` threads while it runs."""

    def __init__(self, source: str, threads: int, shared=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.peer = f"transformers/{threads}t", "F32"
        self.threads = threads
        self.torch = torch
        if shared is not None:  # the same model with another thread count
            self.tokenizer, self.model = shared.tokenizer, shared.model
            return
        directory, kwargs = os.path.dirname(source), {"gguf_file": os.path.basename(source)}
        self.tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()

    def warm(self, batches: list[int], n: int) -> None:
        for b in batches:
            self.run(b, 2)

    def run(self, batch: int, n: int) -> dict:
        torch = self.torch
        prompts = [self.tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)["input_ids"]
                   for i in range(batch)]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.set_num_threads(self.threads)

        def once(tokens: int) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
            return time.perf_counter() - start

        t1, tn = once(1), once(n)
        return {"decode": batch * (n - 1) / max(tn - t1, 1e-9), "first": t1, "tokens": batch * n}


def quality(source: str, formats: list[str], n: int, chars: int) -> list[dict]:
    """Per format: perplexity on the first `chars` characters of the bundled tinyshakespeare (one document, the
    model's context as window, half of it as stride) and greedy agreement with float32 on the prompts: positions
    equal to float32's continuation, and the mean length of the common prefix."""
    from gpt_jax import decode, evaluate, workdir
    from gpt_jax.data.text import BUNDLED_CORPUS

    with open(BUNDLED_CORPUS, encoding="utf-8") as f:
        text = f.read()[:chars]
    base = workdir.load(source)
    prompts = [decode.encode_prompt(base.tokenizer, p) for p in PROMPTS]
    rows, reference = [], None
    for fmt in ["float32"] + [f for f in formats if f != "float32"]:
        loaded = workdir.with_weights(base, *FORMATS[fmt][:2])
        ppl = evaluate.text_perplexity(loaded, text, window=1024, stride=512)["ppl"]
        tokens = [s.token_ids for s in decode.generate(loaded.model, loaded.model_cfg, prompts, n)]
        reference = reference or tokens
        same = sum(a == b for x, y in zip(tokens, reference, strict=True) for a, b in zip(x, y, strict=False))
        prefix = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
                  for x, y in zip(tokens, reference, strict=True)]
        rows.append({"format": fmt, "ppl": ppl, "greedy_agreement": same / sum(map(len, reference)),
                     "common_prefix": statistics.mean(prefix)})
        print(f"quality {fmt}: ppl {ppl:.4f}, greedy agreement {rows[-1]['greedy_agreement']:.3f}", file=sys.stderr)
    return rows


def main(argv: list[str]) -> int:
    """Measures every implementation, interleaved; prints a table of decode tokens/s with ratios to llama.cpp."""
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}")
    args = flags.FLAGS
    if not os.path.exists(args.model):
        raise UserError(f"--model {args.model} does not exist (see tests/conftest.py for the SmolLM2 GGUF)")
    try:
        batches = [int(b) for b in args.batch.split(",")]
        thread_counts = [int(t) for t in args.torch_threads.split(",") if t]
    except ValueError:
        raise UserError("--batch and --torch_threads take comma-separated integers") from None
    formats = [f for f in args.formats.split(",") if f]
    via = [v for v in args.via.split(",") if v]
    if unknown := [f for f in formats if f not in FORMATS] + [v for v in via if v not in ("server", "engine")]:
        raise UserError(f"unknown --formats or --via value(s): {', '.join(unknown)}")
    impls: list = []
    servers = [Server(args.model, f, max(batches)) for f in formats] if "server" in via else []
    try:
        for server in servers:  # started together: their loading and compiling overlap
            server.wait_ready()
            print(f"{server.name} ready", file=sys.stderr)
        impls += servers
        if "engine" in via:
            impls += [Engine(args.model, f, max(batches)) for f in formats]
        if args.llama_cpp:
            models = args.llama_cpp_models or tempfile.mkdtemp(prefix="llama_cpp_models_")
            os.makedirs(models, exist_ok=True)
            qtypes = dict.fromkeys(FORMATS[f][2] for f in formats)
            impls += [LlamaCpp(args.llama_cpp, args.model, q, args.llama_cpp_threads, models) for q in qtypes]
        for threads in thread_counts:
            cli.require("test", "torch", "transformers")
            shared = next((i for i in impls if isinstance(i, Transformers)), None)
            impls.append(Transformers(args.model, threads, shared))
        n = args.new_tokens
        for impl in impls:  # warm-up: compiles every shape the rounds use
            impl.warm(batches, n)
        samples: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for b in batches:
                for impl in impls:
                    result = impl.run(b, n)
                    samples.setdefault((impl.name, b), []).append(result)
                    print(f"round {r}: {impl.name} batch {b}: {result['decode']:.1f} tok/s after the first, "
                          f"first token {result['first']:.3f}s", file=sys.stderr)
    finally:
        for server in servers:
            server.close()
    rows = []
    for b in batches:
        for impl in impls:
            runs = samples[(impl.name, b)]
            rows.append({"impl": impl.name, "peer": impl.peer, "batch": b,
                         "decode_tokens_per_s": statistics.median(x["decode"] for x in runs),
                         "first_token_s": statistics.median(x["first"] for x in runs)})
    print(f"\n`python tools/bench_decode.py {' '.join(sys.argv[1:])}`")
    print(f"{os.path.basename(args.model)}, {n} new tokens, greedy, median of {args.rounds} interleaved rounds, "
          f"{os.cpu_count()} CPU cores")
    print("| implementation | batch | decode tok/s | first token s | ÷ llama.cpp (same precision) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        peer = next((r for r in rows if r["batch"] == row["batch"] and r["impl"] == f"llama.cpp {row['peer']}"),
                    None)
        ratio = f"{row['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}×" if peer and peer is not row else ""
        print(f"| {row['impl']} | {row['batch']} | {row['decode_tokens_per_s']:.1f} | {row['first_token_s']:.3f} | "
              f"{ratio} |")
    checks = quality(args.model, formats, n, args.quality_chars) if args.quality_chars else []
    if checks:
        print(f"\nquality: perplexity on the first {args.quality_chars:,} characters of tinyshakespeare (bundled), "
              f"greedy tokens of the {len(PROMPTS)} prompts against float32's")
        print("| weights | perplexity | vs float32 | greedy tokens equal | mean common prefix |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for c in checks:
            print(f"| {c['format']} | {c['ppl']:.4f} | {100 * (c['ppl'] / checks[0]['ppl'] - 1):+.2f}% | "
                  f"{100 * c['greedy_agreement']:.1f}% | {c['common_prefix']:.1f} of {n} |")
    if args.json:
        own = {f.name: f.value for f in flags.FLAGS.get_flags_for_module(sys.modules[__name__])}
        with open(args.json, "w") as f:
            json.dump({"args": own, "rows": rows, "quality": checks}, f, indent=1)
    return 0


if __name__ == "__main__":
    cli.run(main)
