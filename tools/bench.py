"""Benchmarks, each a section printing a table of ratios against peers measured in the same run.

    python tools/bench.py data [--mb=43,430] [--train_steps=3] [--workdir=DIR]
    python tools/bench.py train [--rounds=5] [--steps=20] [--shapes=shakespeare_char,cpu_medium]
        [--ablate_query_blocks]
    python tools/bench.py kernels [--rounds=5]
    python tools/bench.py finetune [--finetune_steps=5] [--finetune_batch=8]
        [--finetune_configs=finetune_shakespeare_lora,finetune_shakespeare] [--nofinetune_peer]
    python tools/bench.py gpu [--gpu_batch=16,32] [--gpu_steps=10] [--gpu_remat=none,dots]
        [--gpu_activation_dtype=float32,bfloat16] [--gpu_loss_chunk=0,2048] [--gpu_profile]
        [--nogpu_isolate] [--gpu_variant_timeout=150]   (on a GPU machine)

Sections:
- `data`: tools/prepare_data.py (the Beam pipeline, every core) on corpora generated from tinyshakespeare of the
  `--mb` sizes: wall time, MB/s, CPU %, peak RSS (`/usr/bin/time -v`) and the summed RSS of all its processes; then
  the shard reader feeding training at configs/small.py's sequence length against the tokens/s that
  configs/small.py's training step consumes on this machine (measured with a small batch; --train_steps=0 skips
  it), plus near-duplicate detection precision/recall on synthetic pairs.
- `train`: training tokens/s of our jitted train step against transformers' GPT2LMHeadModel trained with
  torch.optim.AdamW on the same shapes and batch (interleaved rounds, median ratio), and CPU MFU against a float32
  matmul rate measured in the same rounds.
- `kernels`: the float32 matmuls of those two models one at a time, XLA:CPU against torch, GFLOP/s each.
- `finetune`: LoRA (and with --finetune_configs full) fine-tuning of SmolLM2-135M through `python -m gpt_jax.main`
  against transformers + peft on the same GGUF: step tokens/s, first step after loading, peak RSS; each config
  twice on a compilation cache of its own, compiled (empty) and cached (the step read back).

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


def timed_process(command: list[str], marks: dict[str, str], env: dict | None = None, tree: bool = False) -> dict:
    """Runs `command` under `/usr/bin/time -v`, reading its output (stdout and stderr together) as it comes: the
    seconds from start to the first line containing each of `marks` (name → text), the output lines, and from
    /usr/bin/time the wall seconds, CPU % and peak RSS in bytes of the largest process; with `tree`, also the
    summed peak RSS of the process and all its descendants (`tree_rss`, sampled)."""
    import re
    import subprocess

    start = time.perf_counter()
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    memory = _TreeMemory(process.pid) if tree else None
    seen, lines = {}, []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        for name, text in marks.items():
            if name not in seen and text in line:
                seen[name] = time.perf_counter() - start
    tree_rss = memory.stop() if memory else None
    if process.wait() != 0:
        raise RuntimeError(f"{command[:4]} failed:\n" + "\n".join(lines[-40:]))
    text = "\n".join(lines)

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {"marks": seen, "lines": lines, "wall": wall, "cpu": int(field("Percent of CPU this job got").rstrip("%")),
            "rss": int(field("Maximum resident set size (kbytes)")) * 1024, "tree_rss": tree_rss}


# ----------------------------------------------------------------------------------------------------------------
# finetune

_PEFT_STEP = """
import sys, time, numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, steps, batch, seq, corpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
directory, name = gguf.rsplit("/", 1)
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
model.train()
tokens = np.asarray(tokenizer(open(corpus).read()[:400000])["input_ids"])
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
rng = np.random.default_rng(0)
print("loaded", flush=True)
for step in range(1, steps + 1):
    starts = rng.integers(0, len(tokens) - seq - 1, batch)
    ids = torch.tensor(np.stack([tokens[s:s + seq + 1] for s in starts]))
    t = time.perf_counter()
    logits = model(input_ids=ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"peft step {step} loss {loss.item():.4f} seconds {time.perf_counter() - t:.3f}", flush=True)
"""


def bench_finetune(args) -> list[str]:
    """LoRA fine-tuning of SmolLM2-135M (rank 8 on the seven projections, batch × 256 tokens, AdamW) as
    configs/finetune_shakespeare_lora.py runs it through `python -m gpt_jax.main`, against transformers + peft in
    float32 on the same GGUF, each in a process of its own under /usr/bin/time -v: step tokens/s (median over the
    steps after the first), the first step's time after the model is loaded, peak RSS. Each config runs twice on a
    compilation cache of its own: "compiled" (empty: the first step includes compiling the train step) and "cached"
    (a second run, as a resumed or repeated one: the step is read back)."""
    import re

    from gpt_jax.config import cached
    from gpt_jax.data.text import BUNDLED_CORPUS

    gguf = cached("SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(gguf):
        raise UserError(f"{gguf} is missing (see configs/finetune_shakespeare.py)")
    steps, batch, seq = args.finetune_steps, args.finetune_batch, 256
    rows = []
    for entry in args.finetune_configs.split(","):
        config, *overrides = entry.split(":")  # NAME:key=value:... runs configs/NAME.py with --config.key=value
        # twice, on a compilation cache of its own: first empty (the train step compiles), then holding that step
        with tempfile.TemporaryDirectory() as cache:
            for run in ("compiled", "cached"):
                with tempfile.TemporaryDirectory() as workdir:
                    ours = timed_process(
                        [sys.executable, "-m", "gpt_jax.main", f"--config=configs/{config}.py", f"--workdir={workdir}",
                         *(f"--config.{o}" for o in overrides),
                         f"--config.train_steps={steps}", f"--config.batch_size={batch}", f"--config.seq_len={seq}",
                         "--config.log_every=1", "--config.eval_every=0", "--config.eval_steps=1",
                         "--config.checkpoint_every=0", "--config.final_eval_full=False",
                         "--config.sample.max_new_tokens=0"],
                        {"loaded": "model: ", "first": "step 1/"}, env={"JAX_COMPILATION_CACHE_DIR": cache})
                rates = [float(re.search(r"  ([\d,]+) tok/s", line).group(1).replace(",", ""))
                         for line in ours["lines"] if re.match(r"step \d+/", line)][1:]
                rows.append([" ".join(["gpt_jax", config, *overrides, f"({run})"]), statistics.median(rates),
                             ours["marks"]["first"] - ours["marks"]["loaded"], ours["rss"] / 2**30])
    if args.finetune_peer:
        cli.require("test", "torch", "transformers")
        peer = timed_process([sys.executable, "-c", _PEFT_STEP, gguf, str(steps), str(batch), str(seq),
                              BUNDLED_CORPUS], {"loaded": "loaded", "first": "peft step 1 "})
        seconds = [float(line.rsplit(" ", 1)[1]) for line in peer["lines"] if line.startswith("peft step")][1:]
        rows.append(["transformers + peft", statistics.median(batch * seq / s for s in seconds),
                     peer["marks"]["first"] - peer["marks"]["loaded"], peer["rss"] / 2**30])
    lines = [f"\nfinetune: SmolLM2-135M, batch {batch} x {seq}, {steps} steps each, one process each "
             f"(/usr/bin/time -v); tokens/s: median over steps 2-{steps}; first step: seconds after loading",
             *table(["run", "tokens/s", "first step s", "peak RSS GiB"], rows)]
    if args.finetune_peer:
        for row in rows[:-1]:
            lines.append(f"{row[0]}: {row[1] / rows[-1][1]:.2f}x the tokens/s of transformers + peft")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# data


def variants_corpus(directory: str, megabytes: float, seed: int = 0, speeches_per_paragraph: int = 6) -> int:
    """A corpus of about `megabytes` MB made reproducibly from the bundled tinyshakespeare: file k is a variant of
    the whole text with the words of every line shuffled by a seed of (seed, k), so dedup keeps them, and with
    `speeches_per_paragraph` consecutive speeches per blank-line-separated paragraph (~900 bytes, the size of a
    book's paragraph: the issue's books had 1,118 documents per MB). Every 25th file is an exact copy of the one
    before it and the 25th after that a near copy (1% of words replaced), so both dedups have work. Returns the
    bytes written; a directory already holding the corpus is kept."""
    import numpy as np

    from gpt_jax.data import text as text_lib

    marker = os.path.join(directory, ".complete")
    if os.path.exists(marker):
        with open(marker) as f:
            return int(f.read())
    os.makedirs(directory, exist_ok=True)
    speeches = [s for s in text_lib.load_corpus("")[0].split("\n\n") if s.strip()]
    words, separators, line_of_word = [], [], []
    for i, speech in enumerate(speeches):
        lines = [line.split() for line in speech.split("\n")]
        lines = [line for line in lines if line]
        for j, line in enumerate(lines):
            for w, word in enumerate(line):
                words.append(word)
                line_of_word.append(len(separators) - w)  # index of the line's first word: a key per line
                last_line = j == len(lines) - 1
                if w < len(line) - 1:
                    separators.append(" ")
                elif not last_line:
                    separators.append("\n")
                else:
                    separators.append("\n\n" if (i + 1) % speeches_per_paragraph == 0 else "\n")
    words, separators = np.array(words, object), np.array(separators, object)
    line_of_word = np.array(line_of_word)
    written, index, previous, previous_words = 0, 0, None, None
    while written < megabytes * 1e6:
        rng = np.random.default_rng([seed, index])
        if previous is not None and index % 25 == 12:  # an exact copy of the file before
            variant = previous
        else:
            if previous_words is not None and index % 25 == 24:  # a near copy of the file before
                shuffled = previous_words.copy()
                swap = rng.choice(len(shuffled), len(shuffled) // 100, replace=False)
                shuffled[swap] = words[rng.integers(0, len(words), len(swap))]
            else:  # words shuffled within each line
                shuffled = words[np.lexsort((rng.random(len(words)), line_of_word))]
            out = np.empty(2 * len(words), object)
            out[0::2], out[1::2] = shuffled, separators
            variant = "".join(out.tolist()).strip() + "\n"
            previous_words = shuffled
        data = variant.encode("utf-8")[:max(0, int(megabytes * 1e6) - written)]
        data = data[:data.rfind(b"\n\n") + 1] if len(data) < len(variant.encode("utf-8")) else data
        with open(os.path.join(directory, f"variant{index:04d}.txt"), "wb") as f:
            f.write(data)
        written += len(data)
        previous = variant
        index += 1
        if len(data) < 1000:
            break
    with open(marker, "w") as f:
        f.write(str(written))
    return written


class _TreeMemory:
    """Samples the summed resident memory of a process and all its descendants (from /proc), keeping the peak:
    /usr/bin/time reports the largest single process, and the DirectRunner's workers are processes of their own."""

    def __init__(self, pid: int, interval: float = 0.25):
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_rss(self) -> int:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(name))
        total, todo = 0, [self.pid]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._tree_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_prepare_data(input_dir: str, output_dir: str, extra: list[str]) -> dict:
    """tools/prepare_data.py on a corpus (paragraph documents, exact and near dedup, vocabulary 8000, the tool's
    default runner) in a process of its own (`timed_process`): wall seconds, CPU %, the largest process's peak RSS,
    the process tree's summed peak RSS and the manifest."""
    import json

    result = timed_process(
        [sys.executable, os.path.join(ROOT, "tools", "prepare_data.py"), f"--input={os.path.join(input_dir, '*.txt')}",
         f"--output_dir={output_dir}", "--doc_split=paragraph", "--dedup=exact,near", "--vocab_size=8000",
         "--overwrite", "--progress=30", *extra], {}, env={"PYTHONPATH": ROOT}, tree=True)
    with open(os.path.join(output_dir, "manifest.json")) as f:
        result["manifest"] = json.load(f)
    return result


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
    """tools/prepare_data.py on generated corpora of the `--mb` sizes (table: size, documents, wall, MB/s, CPU %,
    peak RSS), then, unless --train_steps=0, the shard reader and configs/small.py's consumption, and
    near-duplicate detection on synthetic pairs."""
    from gpt_jax.data import corpus, minhash

    work = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    workers = corpus.direct_runner_flags([])
    lines = [f"## data: tools/prepare_data.py --doc_split=paragraph --dedup=exact,near --vocab_size=8000 "
             f"({' '.join(workers) or 'DirectRunner in one process'}; {os.cpu_count()} cores; load average "
             f"{os.getloadavg()[0]:.1f} at the start)",
             f"command: python tools/bench.py data --mb={args.mb}",
             "corpus: variants of tinyshakespeare (words shuffled within lines, 6 speeches per paragraph; every 25th "
             "file an exact copy, every 25th another a near copy)"]
    rows, out_dir = [], ""
    for mb in [float(m) for m in str(args.mb).split(",")]:
        corpus_dir = os.path.join(work, f"corpus-{mb:g}MB")
        size = variants_corpus(corpus_dir, mb)
        out_dir = os.path.join(work, f"prepared-{mb:g}MB")
        result = run_prepare_data(corpus_dir, out_dir, [])
        m = result["manifest"]
        removed = ", ".join(f"{k} {v:,}" for k, v in m["removed"].items() if v) or "nothing"
        rows.append([f"{size / 1e6:,.1f} MB", m["documents_read"], m["documents_kept"], f"{result['wall']:.1f}",
                     f"{size / 1e6 / result['wall']:.2f}", f"{result['cpu']}%", f"{result['rss'] / 2**20:,.0f}",
                     f"{result['tree_rss'] / 2**20:,.0f}"])
        lines.append(f"{size / 1e6:,.1f} MB: removed {removed}; tokens {sum(m['tokens'].values()):,} in "
                     f"{len(m['shards'])} shards; load average {os.getloadavg()[0]:.1f} at the end")
    lines += [""] + table(["corpus", "documents", "kept", "wall s", "MB/s", "CPU", "peak RSS MiB",
                           "all processes MiB"], rows)
    lines.append("(peak RSS: /usr/bin/time -v, the largest process; all processes: the sum over the tool and its "
                 "worker processes, sampled every 0.25 s)")
    if args.train_steps <= 0:
        return lines
    rows = [["shard reader, batch 8 x 1024", measure_reader(out_dir, 8, 1024, args.reader_batches)]]
    consumption = measure_small_training(out_dir, args.train_batch, args.train_steps, 8000)
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
                     activation_dtype="float32", attention_block=None, loss_chunk=None):
    """(mesh, model config, state, jitted train step, parameter count) on one device, with
    configs/shakespeare_char.py's optimizer settings; `attention_block` and `loss_chunk` override the config's."""
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
    if loss_chunk is not None:
        c.loss_chunk = loss_chunk
    c.mesh.data = 1
    model_cfg = ModelConfig.from_config(c)
    mesh = sharding.make_mesh(c.mesh)
    with jax.set_mesh(mesh):
        run = steps.setup(c, model_cfg, mesh)
        step = jax.jit(steps.make_train_step(run, 1, False, loss_chunk=c.loss_chunk), donate_argnums=(0,))
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
VARIANT = ("batch", "activations", "remat", "loss chunk")  # a variant's settings: the first columns of its row


def _failed_row(variant: tuple, why: str) -> dict:
    return {**dict(zip(VARIANT, variant, strict=True)), "ms/step": f"failed: {why}"}


def _gpu_variant(args, batch_size: int, act: str, remat: str, loss_chunk: int, peak: float) -> tuple[dict, list]:
    """Times one GPT-2 124M variant in this process: (its row as a dict, the profile table's lines with
    --gpu_profile). The bf16 matmul ceiling is measured here too, beside the step it is compared with."""
    import jax
    import numpy as np

    from gpt_jax.metrics import flops_per_token

    ceiling = matmul_ceiling_flops(args.gpu_ceiling_n, 10, "bfloat16")
    t = time.perf_counter()
    mesh, model_cfg, state, step, n_params = _jax_train_setup(
        12, 12, 768, 1024, batch_size, 50304, "bfloat16", train_steps=1000, remat=remat, activation_dtype=act,
        loss_chunk=loss_chunk)
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
        profile = []
        if args.gpu_profile:
            with tempfile.TemporaryDirectory() as trace_dir:
                jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
                for _ in range(3):
                    state, metrics = step(state, batch)
                jax.block_until_ready(metrics["train_loss"])
                jax.profiler.stop_trace()
                profile = _profile_table(trace_dir, 3, statistics.median(times))
    step_s = statistics.median(times)
    tokens_per_s = batch_size * 1024 / step_s
    achieved = flops_per_token(model_cfg, n_params, 1024) * tokens_per_s
    row = {**dict(zip(VARIANT, (batch_size, act, remat, loss_chunk), strict=True)),
           "ms/step": f"{step_s * 1e3:.1f}", "tokens/s": round(tokens_per_s), "TFLOP/s": f"{achieved / 1e12:.3g}",
           "MFU": f"{achieved / peak:.1%}" if peak else "n/a",
           "of ceiling": f"{achieved / ceiling:.1%} ({ceiling / 1e12:.3g})", "setup s": f"{setup_s:.0f}",
           "compile s": f"{compile_s:.0f}", "loss": f"{float(metrics['train_loss']):.3f}", "parameters": n_params}
    return row, profile


def _profile_table(trace_dir: str, steps: int, step_s: float, top: int = 15) -> list[str]:
    """The ops that took the most time in a jax.profiler trace of `steps` steps, per step. On a GPU the device's
    "XLA Ops" line (else its streams' kernels); on a CPU, where XLA runs its ops on host threads, the host's events
    less the Python functions ("$...") and the runtime's scopes around the ops ("...::...", "PjitFunction(...)")."""
    import glob
    import gzip
    import json

    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return [f"(no trace file under {trace_dir})"]
    with gzip.open(paths[0], "rt") as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    device = {e["pid"] for e in meta if e.get("name") == "process_name" and "/device:" in e["args"]["name"]}
    lines = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"
             and e["pid"] in device}
    lanes = ({k for k, name in lines.items() if "XLA Ops" in name}
             or {k for k, name in lines.items() if "Stream" in name} or set(lines))

    def counted(e) -> bool:
        if device:
            return (e["pid"], e["tid"]) in lanes
        return not e["name"].startswith(("$", "PjitFunction(")) and "::" not in e["name"]

    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e and counted(e):
            totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"] / 1e3 / steps
    busy = sum(totals.values())
    rows = [[name[:70], f"{ms:.2f}", f"{ms / (step_s * 1e3):.1%}"]
            for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    where = "device" if device else "host"
    return [f"profile: {steps} steps traced; {busy:.1f} ms per step of {where} events, step {step_s * 1e3:.1f} ms"] + \
        table(["op", "ms/step", "of step"], rows)


def _gpu_child(args, variant: tuple, peak: float) -> tuple[dict, list]:
    """Runs one variant as `python tools/bench.py gpu` in its own process, under --gpu_variant_timeout, echoing its
    output: one that hangs or runs out of memory costs only its own time and leaves the GPU to the next."""
    import json
    import subprocess
    import threading

    batch_size, act, remat, loss_chunk = variant
    command = [sys.executable, "-u", os.path.abspath(__file__), "gpu", "--nogpu_isolate", f"--gpu_batch={batch_size}",
               f"--gpu_activation_dtype={act}", f"--gpu_remat={remat}", f"--gpu_loss_chunk={loss_chunk}",
               f"--gpu_steps={args.gpu_steps}", f"--gpu_ceiling_n={args.gpu_ceiling_n}", f"--peak_flops={peak}",
               "--gpu_profile" if args.gpu_profile else "--nogpu_profile"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict = {"row": None, "profile": []}

    def echo():
        for line in proc.stdout:  # the child's lines up to its row (its own table after that repeats the row)
            if line.startswith("ROW "):
                found.update(json.loads(line[4:]))
            elif found["row"] is None:
                print("    " + line, end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=args.gpu_variant_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(5)
    if found["row"] is None:
        why = "timed out" if proc.returncode == -9 else f"exit status {proc.returncode}"
        return _failed_row(variant, f"{why} (output above)"), []
    return found["row"], found["profile"]


def bench_gpu(args) -> list[str]:
    """GPT-2 124M (configs/small.py's shape) training MFU on one GPU: bf16 matmuls with cuDNN flash attention, over
    the given batch sizes, activation dtypes, remat policies and loss chunks. Each variant prints a line as it
    starts and its row as it finishes (the table comes at the end); with --gpu_isolate (the default) each runs in a
    process of its own under a time limit, and one that fails gets a row saying so. --gpu_profile adds each
    variant's slowest ops from a jax.profiler trace of 3 steps."""
    import itertools
    import json

    import jax

    device = jax.devices()[0] if not args.gpu_isolate else None  # the parent leaves the GPU to its children
    kind = device.device_kind if device else _gpu_kind()
    peak = args.peak_flops or (H100_BF16_PEAK if "H100" in kind or "H200" in kind else 0.0)
    lines = [f"## gpu: GPT-2 124M training, bf16 matmuls + cuDNN attention, on {kind} (jax {jax.__version__})",
             f"command: python tools/bench.py gpu --gpu_batch={args.gpu_batch} --gpu_steps={args.gpu_steps} "
             f"--gpu_remat={args.gpu_remat} --gpu_activation_dtype={args.gpu_activation_dtype} "
             f"--gpu_loss_chunk={args.gpu_loss_chunk}" + (" --gpu_profile" if args.gpu_profile else "") +
             ("" if args.gpu_isolate else " --nogpu_isolate")]
    header = [*VARIANT, "ms/step", "tokens/s", "TFLOP/s", "MFU", "of ceiling", "setup s", "compile s", "loss"]
    rows, profiles, n_params = [], [], 0
    variants = itertools.product([int(b) for b in args.gpu_batch.split(",")], args.gpu_activation_dtype.split(","),
                                 args.gpu_remat.split(","), [int(c) for c in args.gpu_loss_chunk.split(",")])
    for variant in variants:
        print(f"{time.strftime('%H:%M:%S')} starting batch={variant[0]} activations={variant[1]} remat={variant[2]} "
              f"loss_chunk={variant[3]}", flush=True)
        if args.gpu_isolate:
            row, profile = _gpu_child(args, variant, peak)
        else:
            try:
                row, profile = _gpu_variant(args, *variant, peak)
            except Exception as e:  # noqa: BLE001 - one failed variant (e.g. out of memory) must not lose the others
                row, profile = _failed_row(variant, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"), []
            print("ROW " + json.dumps({"row": row, "profile": profile}), flush=True)
        n_params = row.get("parameters", n_params)
        rows.append([row.get(h, "") for h in header])
        profiles += [f"### batch={variant[0]} activations={variant[1]} remat={variant[2]} loss_chunk={variant[3]}",
                     *profile] if profile else []
    lines += table(header, rows)
    lines.append(f"(x 1024 tokens per sequence, {n_params:,} parameters with vocab 50304; FLOPs = 6N + attention per "
                 f"token; MFU against {peak / 1e12:.0f} TFLOP/s, the datasheet's dense bf16 peak; of ceiling: against "
                 f"a {args.gpu_ceiling_n}^3 bf16 matmul timed in the variant's process (best of 10), TFLOP/s in "
                 f"brackets; median of {args.gpu_steps} steps; loss chunk 0 = the output layer and loss over all "
                 f"tokens at once)")
    return lines + profiles


def _gpu_kind() -> str:
    """The first GPU's name from nvidia-smi, without starting JAX on it (which would take most of its memory)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out.splitlines()[0] if out else "no GPU found by nvidia-smi"


SECTIONS = {"data": bench_data, "train": bench_train, "kernels": bench_kernels, "finetune": bench_finetune,
            "gpu": bench_gpu}

flags.DEFINE_string("workdir", "", "keep inputs and outputs here (default: a temporary directory)")
flags.DEFINE_string("mb", "43,430", "data: comma-separated sizes in MB of the generated corpora")
flags.DEFINE_integer("reader_batches", 200, "data: batches timed for the reader")
flags.DEFINE_integer("train_batch", 1, "data: batch of the small.py step timing")
flags.DEFINE_integer("train_steps", 3, "data: small.py steps timed")
flags.DEFINE_integer("rounds", 5, "train, kernels: interleaved rounds")
flags.DEFINE_integer("steps", 20, "train: steps per round and framework")
flags.DEFINE_string("shapes", ",".join(TRAIN_SHAPES), f"train: comma-separated, of {', '.join(TRAIN_SHAPES)}")
flags.DEFINE_string("dtype", "float32", "train: gpt_jax model.dtype")
flags.DEFINE_bool("ablate_query_blocks", False, "train: also time our step with CPU attention over the full causal "
                  "square (model.attention_block=0)")
flags.DEFINE_integer("finetune_steps", 5, "finetune: steps per run")
flags.DEFINE_integer("finetune_batch", 8, "finetune: sequences of 256 tokens per step")
flags.DEFINE_string("finetune_configs", "finetune_shakespeare_lora", "finetune: comma-separated configs/NAME.py "
                    "(e.g. finetune_shakespeare for full fine-tuning), each with optional :key=value config overrides "
                    "(finetune_shakespeare_lora:model.remat=full)")
flags.DEFINE_bool("finetune_peer", True, "finetune: also run transformers + peft (needs `pip install peft`)")
flags.DEFINE_bool("gpu", False, "run the gpu section (same as naming it)")
flags.DEFINE_string("gpu_batch", "16", "gpu: comma-separated sequences of 1024 tokens per step")
flags.DEFINE_integer("gpu_steps", 10, "gpu: timed steps")
flags.DEFINE_string("gpu_remat", "none", "gpu: comma-separated model.remat variants")
flags.DEFINE_string("gpu_activation_dtype", "bfloat16", "gpu: comma-separated model.activation_dtype variants")
flags.DEFINE_string("gpu_loss_chunk", "2048", "gpu: comma-separated loss_chunk variants (0 = the whole batch at once)")
flags.DEFINE_bool("gpu_isolate", True, "gpu: each variant in a process of its own, under --gpu_variant_timeout")
flags.DEFINE_integer("gpu_variant_timeout", 150, "gpu: seconds one variant's process may take")
flags.DEFINE_integer("gpu_ceiling_n", 8192, "gpu: size of the square bf16 matmul timed as the ceiling")
flags.DEFINE_bool("gpu_profile", False, "gpu: also trace 3 steps of each variant and print its slowest ops")
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
