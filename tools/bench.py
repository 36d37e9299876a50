"""Benchmarks, each a section printing a table of ratios against peers measured in the same run.

    python tools/bench.py data [--mb=8] [--train_steps=3] [--workdir=DIR]
    python tools/bench.py train [--rounds=5] [--steps=20] [--shapes=shakespeare_char,cpu_medium]
        [--ablate_query_blocks]
    python tools/bench.py kernels [--rounds=5]
    python tools/bench.py --gpu [--gpu_batch=16,32] [--gpu_steps=10] [--gpu_remat=none,dots]
        [--gpu_activation_dtype=float32,bfloat16]   (on a GPU machine)

Sections:
- `data`: delivered tokens/s of the data pipeline (tools/prepare_data.py's Beam pipeline on a synthetic corpus,
  and the shard reader feeding training at configs/small.py's sequence length) against the tokens/s that
  configs/small.py's training step consumes on this machine (measured with a small batch), plus near-duplicate
  detection precision/recall on synthetic pairs.
- `train`: training tokens/s of our jitted train step against transformers' GPT2LMHeadModel trained with
  torch.optim.AdamW on the same shapes and batch (interleaved rounds, median ratio), and CPU MFU against a float32
  matmul rate measured in the same rounds.
- `kernels`: the float32 matmuls of those two models one at a time, XLA:CPU against torch, GFLOP/s each.

Add a section by writing `def bench_NAME(args) -> list[str]` (the lines to print) and listing it in SECTIONS.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time

from absl import flags

from gpt_jax import cli, hostmem
from gpt_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# As `python -m gpt_jax.main` does, before JAX starts threads; the torch peers run in this process too, so both
# sides get the same malloc (GPT_JAX_MALLOC=system measures glibc's defaults instead).
HOST_MALLOC = "kept (gpt_jax.hostmem)" if hostmem.keep_freed_memory() else "system default"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A plain-text table, numbers right-aligned."""
    cells = [header] + [[f"{c:,.1f}" if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c)
                         for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]


# ----------------------------------------------------------------------------------------------------------------
# data


def synthetic_corpus(directory: str, megabytes: float, seed: int = 0) -> None:
    """Files of Zipf-distributed pseudo-words in paragraphs, with some exact and near-duplicate files."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, int(rng.integers(1, 10)))) for _ in range(30000)]
    os.makedirs(directory, exist_ok=True)
    written, index, previous = 0, 0, []
    while written < megabytes * 1e6:
        if previous and index % 20 == 19:  # an exact copy of an earlier file
            text = previous[int(rng.integers(len(previous)))]
        elif previous and index % 20 == 9:  # a near copy: 1% of words replaced
            words = previous[int(rng.integers(len(previous)))].split(" ")
            for i in rng.integers(0, len(words), max(1, len(words) // 100)):
                words[i] = vocab[int(rng.integers(len(vocab)))]
            text = " ".join(words)
        else:
            ids = np.minimum(rng.zipf(1.2, 4000), len(vocab)) - 1
            words = [vocab[i] for i in ids]
            text = "\n\n".join(" ".join(words[i:i + 80]) + "." for i in range(0, len(words), 80))
            previous.append(text)
        with open(os.path.join(directory, f"doc{index:05d}.txt"), "w") as f:
            f.write(text)
        written += len(text)
        index += 1


def measure_prepare(input_dir: str, output_dir: str, beam_flags: list[str]) -> tuple[float, dict]:
    """Wall seconds of one prepare_data run (in this process) and its manifest."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from gpt_jax.data import corpus

    opts = corpus.CorpusOptions(output_dir=output_dir, inputs=[os.path.join(input_dir, "*.txt")],
                                doc_split="paragraph", vocab_size=8192)
    start = time.perf_counter()
    options = PipelineOptions(["--runner=DirectRunner", "--default_sdk_harness_log_level=WARNING", *beam_flags])
    manifest = corpus.prepare(opts, options, overwrite=True)
    return time.perf_counter() - start, manifest


def measure_reader(data_dir: str, batch_size: int, seq_len: int, batches: int) -> float:
    """Tokens/s that ShardSource.train_batches delivers (after the first batch)."""
    from gpt_jax.data import shards

    with tempfile.TemporaryDirectory() as tok_dir:
        it = shards.ShardSource(data_dir, tok_dir).train_batches(batch_size, seq_len, seed=0)
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch_size * seq_len / (time.perf_counter() - start)


def measure_small_training(data_dir: str, batch_size: int, steps: int, vocab_size: int) -> float:
    """Tokens/s that configs/small.py's training consumes on this machine: `gpt_jax.main` trains it for
    `steps` + 1 steps at a small batch on the prepared shards; the median of the logged rates after the first
    (compiling) step."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "gpt_jax.main", "--config=" + os.path.join(ROOT, "configs", "small.py"),
                   f"--workdir={workdir}", f"--config.data.path={data_dir}", f"--config.batch_size={batch_size}",
                   f"--config.train_steps={steps + 1}", "--config.log_every=1", "--config.eval_every=0",
                   "--config.eval_steps=1", f"--config.checkpoint_every={steps + 10}", "--config.keep_checkpoints=1",
                   f"--config.model.vocab_size={vocab_size}", "--config.sample.max_new_tokens=0"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"training configs/small.py failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rates = [r["tokens_per_sec"] for r in map(json.loads, f) if "tokens_per_sec" in r and r["step"] > 1]
    return statistics.median(rates)


def bench_data(args) -> list[str]:
    from gpt_jax.data import minhash

    work = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    corpus_dir, out_dir = os.path.join(work, "corpus"), os.path.join(work, "prepared")
    if not os.path.isdir(corpus_dir):
        synthetic_corpus(corpus_dir, args.mb)
    lines = [f"data: synthetic corpus {args.mb} MB in {corpus_dir}"]
    runs = [("prepare_data, DirectRunner in_memory", [])]
    if args.multi_processing:
        runs.append(("prepare_data, DirectRunner 2 processes",
                     ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]))
    rows = []
    for name, beam_flags in runs:
        seconds, manifest = measure_prepare(corpus_dir, out_dir, beam_flags)
        tokens = sum(manifest["tokens"].values())
        rows.append([name, tokens / seconds])
        lines.append(f"{name}: {tokens:,} tokens ({sum(manifest['bytes'].values()) / 1e6:.1f} MB kept of "
                     f"{manifest['documents_read']:,} documents read, removed {manifest['removed']}) in "
                     f"{seconds:.1f}s")
    rows.append(["shard reader, batch 8 x 1024", measure_reader(out_dir, 8, 1024, args.reader_batches)])
    consumption = measure_small_training(out_dir, args.train_batch, args.train_steps, 32768)
    rows.append([f"configs/small.py train step (batch {args.train_batch} x 1024, CPU)", consumption])
    lines += [""] + table(["stage", "tokens/s", "x small.py consumption"],
                          [[name, rate, f"{rate / consumption:,.0f}x"] for name, rate in rows])
    pr = minhash.detection_table()
    lines += ["", f"near-duplicate detection, {pr['threshold']} threshold, {pr['num_perm']} permutations "
              f"({pr['bands']} bands x {pr['rows']} rows), 100 synthetic pairs per level, 1000 words each:"]
    lines += table(["Jaccard level", "mean exact Jaccard", "pairs found"],
                   [[f"{r['level']:.1f}", f"{r['jaccard']:.3f}", f"{r['found']:.0%}"] for r in pr["levels"]])
    lines.append(f"precision {pr['precision']:.3f}, recall {pr['recall']:.3f} (true pairs: exact Jaccard >= "
                 f"{pr['threshold']})")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# train

TRAIN_SHAPES = {
    # name: (n_layer, n_head, d_model, seq_len, batch)
    "shakespeare_char": (4, 4, 128, 64, 12),
    "cpu_medium": (6, 6, 384, 256, 8),
}


def _jax_train_setup(n_layer, n_head, d_model, seq_len, batch, vocab, dtype, train_steps=2000, remat="none",
                     activation_dtype="float32", attention_block=None):
    """(mesh, model config, state, jitted train step, parameter count) on one device, with
    configs/shakespeare_char.py's optimizer settings; `attention_block` overrides model.attention_block."""
    import jax

    from gpt_jax import config as config_lib
    from gpt_jax import sharding, steps
    from gpt_jax.model import ModelConfig

    c = config_lib.get_config()
    c.train_steps, c.batch_size, c.seq_len = train_steps, batch, seq_len
    c.learning_rate, c.min_learning_rate, c.warmup_steps, c.adam_b2 = 1e-3, 1e-4, 100, 0.99
    c.model.n_layer, c.model.n_head, c.model.d_model, c.model.vocab_size = n_layer, n_head, d_model, vocab
    c.model.dtype, c.model.remat, c.model.activation_dtype = dtype, remat, activation_dtype
    if attention_block is not None:
        c.model.attention_block = attention_block
    c.mesh.data = 1
    model_cfg = ModelConfig.from_config(c)
    mesh = sharding.make_mesh(c.mesh)
    with jax.set_mesh(mesh):
        run = steps.setup(c, model_cfg, mesh)
        step = jax.jit(steps.make_train_step(run, 1, False), donate_argnums=(0,))
    return mesh, model_cfg, run.state, step, sum(x.size for x in jax.tree.leaves(run.state["params"]))


def _jax_train_runner(n_layer, n_head, d_model, seq_len, batch, vocab, dtype, attention_block=None):
    """A function running k of our jitted train steps (configs/shakespeare_char.py's optimizer settings)."""
    import jax
    import numpy as np

    mesh, model_cfg, state, step, n_params = _jax_train_setup(n_layer, n_head, d_model, seq_len, batch, vocab, dtype,
                                                              attention_block=attention_block)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        batches = [{"tokens": jax.device_put(rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32))}
                   for _ in range(4)]
    holder = {"state": state}

    def run(k):
        with jax.set_mesh(mesh):
            s = holder["state"]
            for i in range(k):
                s, metrics = step(s, batches[i % 4])
            jax.block_until_ready(metrics["train_loss"])
            holder["state"] = s

    return run, n_params, model_cfg


def _torch_train_runner(n_layer, n_head, d_model, seq_len, batch, vocab):
    """k training steps of transformers' GPT2LMHeadModel with torch.optim.AdamW on the same shapes."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d_model, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(4)]

    def run(k):
        for i in range(k):
            tokens = batches[i % 4]
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def matmul_ceiling_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of one n×n×n matrix product on JAX's default device (best of `repeats`), the ceiling a run measures
    beside its model: float32 on CPU, bf16 8192³ on a GPU. Random inputs (a GPU draws less power on constants)."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def bench_train(args) -> list[str]:
    """Our train step against transformers' GPT-2 + torch AdamW, interleaved rounds, median ratio; CPU MFU."""
    import platform

    import torch

    from gpt_jax import config as config_lib
    from gpt_jax.metrics import flops_per_token

    default_block = config_lib.get_config().model.attention_block
    lines = [f"## train: gpt_jax vs transformers GPT2LMHeadModel + torch.optim.AdamW (CPU, torch threads "
             f"{torch.get_num_threads()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"freed host memory {HOST_MALLOC})",
             f"command: python tools/bench.py train --rounds={args.rounds} --steps={args.steps} "
             f"--dtype={args.dtype}" + (" --ablate_query_blocks" if args.ablate_query_blocks else "")]
    rows, ablations = [], []
    for name in args.shapes.split(","):
        n_layer, n_head, d_model, seq_len, batch = TRAIN_SHAPES[name]
        vocab = 65
        jax_run, n_params, model_cfg = _jax_train_runner(n_layer, n_head, d_model, seq_len, batch, vocab,
                                                         args.dtype)
        torch_run = _torch_train_runner(n_layer, n_head, d_model, seq_len, batch, vocab)
        jax_run(3)  # compile and warm up
        torch_run(3)
        full_run = None
        if args.ablate_query_blocks and 0 < default_block < seq_len:
            # the same step with CPU attention over the full causal square (model.attention_block = 0)
            full_run = _jax_train_runner(n_layer, n_head, d_model, seq_len, batch, vocab, args.dtype,
                                         attention_block=0)[0]
            full_run(3)
        tokens = args.steps * batch * seq_len
        jax_tps, torch_tps, ratios, ceilings, full_gain = [], [], [], [], []
        for _ in range(args.rounds):
            ceilings.append(matmul_ceiling_flops())
            t = time.perf_counter()
            jax_run(args.steps)
            j = tokens / (time.perf_counter() - t)
            if full_run is not None:
                t = time.perf_counter()
                full_run(args.steps)
                full_gain.append(j / (tokens / (time.perf_counter() - t)))
            t = time.perf_counter()
            torch_run(args.steps)
            p = tokens / (time.perf_counter() - t)
            jax_tps.append(j)
            torch_tps.append(p)
            ratios.append(j / p)
        ceiling = statistics.median(ceilings)
        fpt = flops_per_token(model_cfg, n_params, seq_len)
        j_med = statistics.median(jax_tps)
        rows.append([f"{name} (L{n_layer} d{d_model} T{seq_len} B{batch})", j_med,
                     statistics.median(torch_tps), f"{statistics.median(ratios):.2f}x",
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"{fpt * j_med / ceiling:.1%}",
                     f"{ceiling / 1e9:.0f}"])
        if full_gain:
            ablations.append(f"{name}: query-block attention {statistics.median(full_gain):.2f}x the full-square "
                             f"step's tokens/s (median of {len(full_gain)} interleaved rounds, range "
                             f"{min(full_gain):.2f}-{max(full_gain):.2f})")
    lines += table(["shape", "gpt_jax tok/s", "torch tok/s", "ratio (median)", "ratio range", "gpt_jax MFU",
                    "f32 matmul GFLOP/s"], rows)
    lines += ablations
    lines.append(f"(medians of {args.rounds} interleaved rounds of {args.steps} steps each; MFU = "
                 "(6N + attention) FLOPs/token x tokens/s / the float32 matmul rate measured in the same rounds)")
    return lines


def bench_kernels(args) -> list[str]:
    """The matmuls of the train section's models, one at a time: XLA:CPU (what our step runs) against torch's
    CPU kernels (what the peer runs), interleaved, median time each. Says how much of the train-section gap is
    the matmul kernels themselves."""
    import jax
    import numpy as np
    import torch

    # name: (batch, m, k, n, lhs transposed, rhs transposed), from TRAIN_SHAPES' models (MLP width 4 x d_model)
    cases = {}
    for shape, (_, n_head, d_model, seq_len, batch) in TRAIN_SHAPES.items():
        tokens, d_ff = batch * seq_len, 4 * d_model
        cases[f"{shape} MLP up, forward"] = (1, tokens, d_model, d_ff, False, False)
        cases[f"{shape} MLP up, input gradient"] = (1, tokens, d_ff, d_model, False, True)
        cases[f"{shape} MLP up, weight gradient"] = (1, d_model, tokens, d_ff, True, False)
        cases[f"{shape} attention scores ({batch * n_head} heads x batch)"] = (
            batch * n_head, seq_len, d_model // n_head, seq_len, False, True)
    lines = [f"## kernels: float32 matmuls, XLA:CPU vs torch (torch threads {torch.get_num_threads()}, "
             f"{os.cpu_count()} cores)", f"command: python tools/bench.py kernels --rounds={args.rounds}"]
    rng = np.random.default_rng(0)
    rows = []
    for name, (b, m, k, n, ta, tb) in cases.items():
        a = rng.standard_normal((b, k, m) if ta else (b, m, k), dtype=np.float32)
        w = rng.standard_normal((b, n, k) if tb else (b, k, n), dtype=np.float32)
        spec = f"b{'km' if ta else 'mk'},b{'nk' if tb else 'kn'}->bmn"
        f = jax.jit(lambda x, y, spec=spec: jax.numpy.einsum(spec, x, y))
        ja, jw = jax.device_put(a), jax.device_put(w)
        ta_, tw_ = torch.from_numpy(a), torch.from_numpy(w)
        runs = {"jax": lambda: f(ja, jw).block_until_ready(), "torch": lambda: torch.einsum(spec, ta_, tw_)}
        times = {key: [] for key in runs}
        for _ in range(2):
            for run in runs.values():
                run()
        reps = max(1, int(2e8 / (2 * b * m * k * n)))  # ~0.2 GFLOP per timing
        for _ in range(args.rounds * 3):
            for key, run in runs.items():
                t = time.perf_counter()
                for _ in range(reps):
                    run()
                times[key].append((time.perf_counter() - t) / reps)
        flops = 2 * b * m * k * n
        j, p = statistics.median(times["jax"]), statistics.median(times["torch"])
        rows.append([name, f"{b}x{m}x{k}x{n}", f"{flops / j / 1e9:.0f}", f"{flops / p / 1e9:.0f}", f"{p / j:.2f}x"])
    lines += table(["matmul", "b x m x k x n", "XLA:CPU GFLOP/s", "torch GFLOP/s",
                    "XLA:CPU speed (torch time / XLA time)"], rows)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# gpu

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet figure without sparsity)


def bench_gpu(args) -> list[str]:
    """GPT-2 124M (configs/small.py's shape) training MFU on one GPU: bf16 matmuls with cuDNN flash attention, over
    the given batch sizes, activation dtypes and remat policies. Each variant prints a line as it starts and its row
    as it finishes (progress; the table comes at the end); a variant that fails (out of memory, say) gets a row
    saying so."""
    import itertools

    import jax
    import numpy as np

    from gpt_jax.metrics import flops_per_token

    device = jax.devices()[0]
    peak = args.peak_flops or (H100_BF16_PEAK if "H100" in device.device_kind or "H200" in device.device_kind
                               else 0.0)
    ceiling = matmul_ceiling_flops(8192, 10, "bfloat16")
    lines = [f"## gpu: GPT-2 124M training, bf16 matmuls + cuDNN attention, on {device.device_kind} "
             f"(jax {jax.__version__})",
             f"command: python tools/bench.py gpu --gpu_batch={args.gpu_batch} --gpu_steps={args.gpu_steps} "
             f"--gpu_remat={args.gpu_remat} --gpu_activation_dtype={args.gpu_activation_dtype}",
             f"measured bf16 matmul ceiling (8192^3, best of 10): {ceiling / 1e12:.0f} TFLOP/s"]
    header = ["batch", "activations", "remat", "ms/step", "tokens/s", "TFLOP/s", "MFU", "of ceiling", "setup s",
              "compile s", "loss"]
    rows = []
    n_params = 0
    variants = itertools.product([int(b) for b in args.gpu_batch.split(",")], args.gpu_activation_dtype.split(","),
                                 args.gpu_remat.split(","))
    for batch_size, act, remat in variants:
        print(f"{time.strftime('%H:%M:%S')} starting batch={batch_size} activations={act} remat={remat}", flush=True)
        try:
            t = time.perf_counter()
            mesh, model_cfg, state, step, n_params = _jax_train_setup(
                12, 12, 768, 1024, batch_size, 50304, "bfloat16", train_steps=1000, remat=remat, activation_dtype=act)
            setup_s = time.perf_counter() - t  # parameter and optimizer initialisation (their compiles included)
            rng = np.random.default_rng(0)
            with jax.set_mesh(mesh):
                batch = {"tokens": jax.device_put(rng.integers(0, 50257, (batch_size, 1025), dtype=np.int32))}
                t = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics["train_loss"])
                compile_s = time.perf_counter() - t
                for _ in range(3):
                    state, metrics = step(state, batch)
                jax.block_until_ready(metrics["train_loss"])
                times = []
                for _ in range(args.gpu_steps):
                    t = time.perf_counter()
                    state, metrics = step(state, batch)
                    jax.block_until_ready(metrics["train_loss"])
                    times.append(time.perf_counter() - t)
            step_s = statistics.median(times)
            tokens_per_s = batch_size * 1024 / step_s
            achieved = flops_per_token(model_cfg, n_params, 1024) * tokens_per_s
            row = [batch_size, act, remat, f"{step_s * 1e3:.1f}", tokens_per_s, f"{achieved / 1e12:.0f}",
                   f"{achieved / peak:.1%}" if peak else "n/a", f"{achieved / ceiling:.1%}", f"{setup_s:.0f}",
                   f"{compile_s:.0f}", f"{float(metrics['train_loss']):.3f}"]
            del state, metrics
        except Exception as e:  # noqa: BLE001 - one failed variant (e.g. out of memory) must not lose the others
            row = [batch_size, act, remat, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"] + [""] * 7
        rows.append(row)
        print(" | ".join(str(x) for x in row), flush=True)
    lines += table(header, rows)
    lines.append(f"(x 1024 tokens per sequence, {n_params:,} parameters with vocab 50304; FLOPs = 6N + attention per "
                 f"token; MFU against {peak / 1e12:.0f} TFLOP/s, the datasheet's dense bf16 peak; median of "
                 f"{args.gpu_steps} steps)")
    return lines


SECTIONS = {"data": bench_data, "train": bench_train, "kernels": bench_kernels, "gpu": bench_gpu}

flags.DEFINE_string("workdir", "", "keep inputs and outputs here (default: a temporary directory)")
flags.DEFINE_float("mb", 8.0, "data: size of the synthetic corpus in MB")
flags.DEFINE_bool("multi_processing", False, "data: also run with 2 Beam processes")
flags.DEFINE_integer("reader_batches", 200, "data: batches timed for the reader")
flags.DEFINE_integer("train_batch", 1, "data: batch of the small.py step timing")
flags.DEFINE_integer("train_steps", 3, "data: small.py steps timed")
flags.DEFINE_integer("rounds", 5, "train, kernels: interleaved rounds")
flags.DEFINE_integer("steps", 20, "train: steps per round and framework")
flags.DEFINE_string("shapes", ",".join(TRAIN_SHAPES), f"train: comma-separated, of {', '.join(TRAIN_SHAPES)}")
flags.DEFINE_string("dtype", "float32", "train: gpt_jax model.dtype")
flags.DEFINE_bool("ablate_query_blocks", False, "train: also time our step with CPU attention over the full causal "
                  "square (model.attention_block=0)")
flags.DEFINE_bool("gpu", False, "run the gpu section (same as naming it)")
flags.DEFINE_string("gpu_batch", "16", "gpu: comma-separated sequences of 1024 tokens per step")
flags.DEFINE_integer("gpu_steps", 10, "gpu: timed steps")
flags.DEFINE_string("gpu_remat", "none", "gpu: comma-separated model.remat variants")
flags.DEFINE_string("gpu_activation_dtype", "bfloat16", "gpu: comma-separated model.activation_dtype variants")
flags.DEFINE_float("peak_flops", 0.0, "gpu: peak FLOP/s (default: H100/H200 bf16)")


def main(argv: list[str]) -> int:
    """Runs the sections named by the positional arguments (default: data and train); prints their tables."""
    sections = ["gpu"] if flags.FLAGS.gpu else argv[1:] or ["data", "train"]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if "data" in sections:
        cli.require("data", "apache_beam")
    if "train" in sections:  # the peers
        cli.require("test", "torch", "transformers")
        unknown = [name for name in flags.FLAGS.shapes.split(",") if name not in TRAIN_SHAPES]
        if unknown:
            raise UserError(f"--shapes: unknown shape {unknown[0]!r}: choose from {', '.join(TRAIN_SHAPES)}")
    if "kernels" in sections:
        cli.require("test", "torch")
    logging.getLogger().setLevel(logging.ERROR)
    for name in sections:
        print("\n".join(SECTIONS[name](flags.FLAGS)), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
