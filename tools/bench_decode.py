"""Decode speed of gpt_jax's KV-cached engine against transformers' `generate`, side by side in one process, on the
same GGUF (or HF directory) and the same prompts: greedy, a fixed number of new tokens, batch 1 and 8.

    python tools/bench_decode.py [--model=~/.cache/gpt_jax/SmolLM2-135M-Instruct.Q4_1.gguf] [--batch=1,8]
                                 [--new_tokens=64] [--rounds=3] [--json=FILE]

Decode tokens/s = batch × (N − 1) / (time to generate N tokens − time to generate 1), so prompt processing and
per-call overheads drop out; end-to-end tokens/s (batch × N / time for N) is shown too. Implementations and batch
sizes are interleaved within each round and medians over rounds are reported: on a shared machine timings swing.
Both sides run float32 weights (the GGUF is dequantized on import by both). Needs torch and transformers (the `test`
extra) and `tokenizers` (the `convert` extra).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import flags

from gpt_jax import cli
from gpt_jax.config import cached
from gpt_jax.errors import UserError

flags.DEFINE_string("model", cached("SmolLM2-135M-Instruct.Q4_1.gguf"), "a .gguf file or an HF model directory")
flags.DEFINE_string("batch", "1,8", "comma-separated batch sizes")
flags.DEFINE_integer("new_tokens", 64, "tokens generated per prompt")
flags.DEFINE_integer("rounds", 3, "interleaved rounds; medians are shown")
flags.DEFINE_string("torch_threads", "1,2", "torch thread counts to measure (on a busy machine, 2 threads can be "
                    "far slower)")
flags.DEFINE_string("json", None, "also write the results here")
PROMPTS = ["The capital of France is", "Once upon a time, there was", "The best way to learn programming is",
           "In 1969, the first humans", "My favourite recipe for soup", "The weather today looks",
           "Water boils at a temperature of", "A good night's sleep helps"]


class Ours:
    name = "gpt_jax"

    def __init__(self, source: str, max_batch: int):
        from gpt_jax import decode, workdir

        self.decode = decode
        loaded = workdir.load(source)
        self.tokenizer = loaded.tokenizer
        self.engine = decode.Engine(loaded.model, loaded.model_cfg, max_batch=max_batch, max_len=512)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        states = [self.engine.submit(self.decode.Request(p, max_tokens=n, sampling=self.decode.SamplingParams(0.0)))
                  for p in prompts]
        self.engine.run_until_done()
        return [s.token_ids for s in states]


class Transformers:
    """transformers' `generate`, with torch limited to `threads` threads while it runs."""

    def __init__(self, source: str, threads: int, shared=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"transformers/{threads}t"
        self.threads = threads
        self.torch = torch
        if shared is not None:  # the same model with another thread count
            self.tokenizer, self.model = shared.tokenizer, shared.model
            return
        if source.endswith(".gguf"):
            directory, kwargs = os.path.dirname(source), {"gguf_file": os.path.basename(source)}
        else:
            directory, kwargs = source, {}
        self.tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=pad)
        return out[:, width:].tolist()


def _timed(impl, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = impl.generate(prompts, n)
    return time.perf_counter() - start, out


def main(argv: list[str]) -> int:
    """Measures both implementations; prints a table of decode tokens/s."""
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r}")
    args = flags.FLAGS
    cli.require("test", "torch", "transformers")
    cli.require("convert", "tokenizers")
    if not os.path.exists(args.model):
        raise UserError(f"--model {args.model} does not exist (see tests/conftest.py for the SmolLM2 GGUF)")
    try:
        batches = [int(b) for b in args.batch.split(",")]
        thread_counts = [int(t) for t in args.torch_threads.split(",")]
    except ValueError:
        raise UserError("--batch and --torch_threads take comma-separated integers") from None
    import torch

    print(f"loading {args.model}; torch has {torch.get_num_threads()} threads by default", file=sys.stderr)
    impls: list = [Ours(args.model, max(batches))]
    for threads in thread_counts:
        impls.append(Transformers(args.model, threads, impls[1] if len(impls) > 1 else None))
    prompts = {impl.name: [impl.encode(PROMPTS[i % len(PROMPTS)]) for i in range(max(batches))] for impl in impls}
    n = args.new_tokens
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    for impl in impls:  # warm-up: compiles every shape the rounds use
        for b in batches:
            impl.generate(prompts[impl.name][:b], 1)
            impl.generate(prompts[impl.name][:b], n)
    for r in range(args.rounds):
        for b in batches:
            for impl in impls:
                t1, _ = _timed(impl, prompts[impl.name][:b], 1)
                tn, out = _timed(impl, prompts[impl.name][:b], n)
                samples.setdefault((impl.name, b), []).append((t1, tn))
                outputs[(impl.name, b)] = out
                print(f"round {r}: {impl.name} batch {b}: 1 token {t1:.3f}s, {n} tokens {tn:.3f}s", file=sys.stderr)
    rows = []
    for b in batches:
        for impl in impls:
            runs = samples[(impl.name, b)]
            decode_tps = statistics.median(b * (n - 1) / max(tn - t1, 1e-9) for t1, tn in runs)
            e2e_tps = statistics.median(b * n / tn for _, tn in runs)
            rows.append({"impl": impl.name, "batch": b, "decode_tokens_per_s": decode_tps,
                         "end_to_end_tokens_per_s": e2e_tps, "ms_per_step": 1000 * b / decode_tps})
    print(f"\n{os.path.basename(args.model)} decode on CPU, {n} new tokens, greedy, median of {args.rounds} rounds")
    print(f"{'impl':<16} {'batch':>5} {'decode tok/s':>12} {'ms/step':>8} {'end-to-end tok/s':>16} "
          f"{'ours ÷ this':>11}")
    for row in rows:
        ours = next(r for r in rows if r["batch"] == row["batch"] and r["impl"] == "gpt_jax")
        print(f"{row['impl']:<16} {row['batch']:>5} {row['decode_tokens_per_s']:>12.1f} {row['ms_per_step']:>8.1f} "
              f"{row['end_to_end_tokens_per_s']:>16.1f} "
              f"{ours['decode_tokens_per_s'] / row['decode_tokens_per_s']:>10.2f}×")
    ours_tokens, theirs = outputs[("gpt_jax", 1)][0], outputs[(impls[1].name, 1)][0]
    same = next((i for i, (a, c) in enumerate(zip(ours_tokens, theirs, strict=True)) if a != c), n)
    print(f"greedy tokens identical for the first {same} of {n} (batch 1, prompt {PROMPTS[0]!r})")
    if args.json:
        own = {f.name: f.value for f in flags.FLAGS.get_flags_for_module(sys.modules[__name__])}
        with open(args.json, "w") as f:
            json.dump({"args": own, "rows": rows, "same_prefix": same}, f, indent=1)
    return 0


if __name__ == "__main__":
    cli.run(main)
