"""Evaluation: validation loss, perplexity and bits per byte over a run's validation batches (during training and
for `--mode=eval`, which writes WORKDIR/eval.json and eval.md; an encoder-decoder adds BLEU and chrF of its
translations), perplexity of a text with a sliding window (token perplexity, bits per byte, word-level
perplexity, so models with different tokenizers compare), BLEU / chrF for translation and exact match for
GSM8K-style answers through batched decoding, and markdown tables of results."""

from __future__ import annotations

import copy
import decimal
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import model as model_lib
from gpt_jax import steps
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.workdir import LoadedModel

# ----------------------------------------------------------------------------------------------------------------
# Validation loss, and translation scores of an encoder-decoder


def evaluate_batches(eval_step, params, batches: Sequence[dict], put: Callable | None = None, frozen=()) -> dict:
    """Mean loss, perplexity and bits per byte over `batches` (their loss masks say which targets count), each put
    on the devices by `put` (default: the default device)."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        sums = eval_step(params, put(batch) if put else jax.tree.map(jnp.asarray, batch), *frozen)
        for k in totals:
            totals[k] += float(sums[k])
    loss = totals["nll"] / max(totals["tokens"], 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
            "val_bpb": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0), "val_tokens": int(totals["tokens"])}


def translation_scores(loaded: LoadedModel, sources: Sequence[str], references: Sequence[str],
                       hypotheses_path: str | None = None, beam_size: int = 1, length_penalty: float = 1.0) -> dict:
    """Greedy translations of `sources` by an encoder-decoder scored against `references`: BLEU and chrF
    (sacrebleu defaults) and the seconds decoding took; the translations go to `hypotheses_path`, one a line. With
    beam_size > 1, beam search's translations are scored too (`beam_bleu`, `beam_chrf`; `*_beam.txt` beside)."""
    e = loaded.config.eval

    def scored(beam: int, path: str | None) -> tuple[dict, float, int]:
        from gpt_jax import encdec_decode

        start = time.perf_counter()
        hyps = encdec_decode.translate_texts(loaded, sources, max_new_tokens=e.max_new_tokens,
                                             batch_size=e.batch_size, beam_size=beam, length_penalty=length_penalty)
        seconds = time.perf_counter() - start
        if path and jax.process_index() == 0:
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(h.replace("\n", " ") + "\n" for h in hyps)
        return bleu(hyps, [list(references)]), seconds, len(hyps)

    scores, seconds, sentences = scored(1, hypotheses_path)
    results = {"bleu": scores["bleu"], "chrf": scores["chrf"], "sentences": sentences, "decode_seconds": seconds,
               "bleu_signature": scores["bleu_signature"]}
    if beam_size > 1:
        beam_path = hypotheses_path and hypotheses_path.removesuffix(".txt") + "_beam.txt"
        scores, seconds, _ = scored(beam_size, beam_path)
        results.update(beam_size=beam_size, length_penalty=length_penalty, beam_bleu=scores["bleu"],
                       beam_chrf=scores["chrf"], beam_decode_seconds=seconds)
    return results


class Evaluator:
    """Evaluation during training: the loss over a fixed random subset of `eval_steps` validation batches, or over
    the whole validation split (`full`), where an encoder-decoder adds BLEU and chrF of its greedy translations.
    A decoder-only run with `eval.harness_tasks` adds those lm-evaluation-harness tasks' metrics at every evaluation
    (`harness/TASK/METRIC`)."""

    def __init__(self, config, data, run: steps.TrainSetup, batch_sharding, workdir: str):
        self.config, self.data, self.run, self.workdir = config, data, run, workdir
        self.mesh = batch_sharding.mesh
        self.harness_tasks = [t.strip() for t in config.eval.harness_tasks.split(",") if t.strip()] \
            if config.model.kind != "encoder_decoder" else []
        if self.harness_tasks:
            from gpt_jax import cli

            cli.require("harness", "lm_eval")
            self._merge = jax.jit(run.model_params)  # LoRA: the adapters merged into the base
        self.step = jax.jit(steps.make_eval_step(run.graphdef, data.tokenizer.token_byte_lengths(), run.model_params,
                                                 config.loss_chunk),
                            in_shardings=(run.shardings["params"], batch_sharding) + run.frozen_shardings)
        self.put = lambda batch: jax.device_put(batch, batch_sharding)
        self.quick = data.val_batches(config.batch_size, config.seq_len, config.eval_steps * config.batch_size,
                                      config.seed)
        self._full = None

    def __call__(self, params, step: int, full: bool) -> dict:
        if full and self._full is None:
            self._full = self.data.val_batches(self.config.batch_size, self.config.seq_len)
        result = evaluate_batches(self.step, params, self._full if full else self.quick, self.put, self.run.frozen)
        if full and self.config.model.kind == "encoder_decoder":
            from jax.experimental import multihost_utils

            # every process gathers the parameters and translates (the same sentences), so none waits on another
            host = multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1 else params
            loaded = LoadedModel(nnx.merge(self.run.graphdef, jax.device_get(host)), None, self.data.tokenizer,
                                 self.config, step, "", self.data.source_tokenizer)
            limit = self.config.eval.limit or None
            scores = translation_scores(loaded, self.data.val_sources[:limit], self.data.val_targets[:limit],
                                        workdir_lib.path(self.workdir, "val_hypotheses.txt"))
            result.update(val_bleu=scores["bleu"], val_chrf=scores["chrf"])
        if self.harness_tasks:
            result.update(self._harness(params, step))
        return result

    def _harness(self, params, step: int) -> dict:
        """The harness tasks' metrics on the current parameters: scored on the training mesh where one process
        runs; with several, every process gathers the parameters and runs them alone (the same documents)."""
        from gpt_jax import harness

        params = self._merge(params, *self.run.frozen) if self.run.lora else params
        mesh = self.mesh
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            params = jax.device_get(multihost_utils.process_allgather(params, tiled=True))
            mesh = None  # the local devices
        e = self.config.eval
        loaded = LoadedModel(nnx.merge(self.run.graphdef, params), model_lib.model_config(self.config),
                             self.data.tokenizer, self.config, step, "")
        metrics, _ = harness.evaluate(loaded, self.harness_tasks, include_path=e.harness_include_path or None,
                                      limit=e.harness_limit or None, mesh=mesh,
                                      num_fewshot=e.harness_num_fewshot if e.harness_num_fewshot >= 0 else None)
        return harness.finite_metrics(metrics)


# ----------------------------------------------------------------------------------------------------------------
# Perplexity with a sliding window

TOKENS_PER_BATCH = 4096  # window tokens per forward pass when the batch size is automatic


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of `num_tokens` tokens, as HF's perplexity recipe lays them: a window of up to
    `window` tokens starts every `stride` tokens and scores the targets the previous window did not reach.

    Returns (begin, end, first_target) per window: the window holds tokens [begin, end) and scores tokens
    [first_target, end), each predicted from the tokens before it in the window. The very first token (and with
    stride == window, each window's first) has no context and is not scored."""
    if num_tokens < 2:
        raise UserError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    if window < 2:
        raise UserError(f"--window={window} must be at least 2")
    if not 1 <= stride <= window:
        raise UserError(f"--stride={stride} must be between 1 and the window ({window})")
    spans = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return spans


def token_nll(loaded: LoadedModel, token_ids: np.ndarray, window: int, stride: int,
              batch_size: int = 0) -> np.ndarray:
    """Negative log-likelihood (nats) of each token of `token_ids` under the model, scored with sliding windows
    (see `sliding_windows`); NaN where a token is not scored. `window` may be at most the model's context + 1
    (a window's last token is only a target). batch_size 0 picks ~TOKENS_PER_BATCH tokens per forward pass."""
    token_ids = np.asarray(token_ids, np.int32)
    limit = loaded.model_cfg.max_seq_len + 1
    if window > limit:
        raise UserError(f"--window={window} is longer than the model's context + 1 ({limit})")
    spans = sliding_windows(len(token_ids), window, stride)
    width = max(end - begin for begin, end, _ in spans)
    if batch_size <= 0:
        batch_size = max(1, TOKENS_PER_BATCH // width)
    batch_size = min(batch_size, len(spans))
    graphdef, params = nnx.split(loaded.model, nnx.Param)
    params = nnx.to_pure_dict(params)
    losses_fn = jax.jit(lambda p, tokens: steps.token_losses(graphdef, p, {"tokens": tokens})[0])
    nll = np.full(len(token_ids), np.nan, np.float64)
    for start in range(0, len(spans), batch_size):
        chunk = spans[start:start + batch_size]
        tokens = np.zeros((batch_size, width), np.int32)  # a short last window is padded at its end (causal)
        for row, (begin, end, _) in enumerate(chunk):
            tokens[row, :end - begin] = token_ids[begin:end]
        losses = np.asarray(losses_fn(params, tokens))  # [batch, width - 1]: losses[:, j] predicts token j + 1
        for row, (begin, end, first) in enumerate(chunk):
            nll[first:end] = losses[row, first - begin - 1:end - begin - 1]
    return nll


def perplexity_metrics(nll: np.ndarray, token_ids: np.ndarray, byte_lengths: np.ndarray, text: str) -> dict:
    """Token perplexity, bits per byte (over the UTF-8 bytes of the scored tokens) and two word-level perplexities
    of `text` from per-token NLL (NaN = not scored): `word_ppl` divides the total NLL by the whitespace-separated
    words, `word_ppl_eos` by the words plus the line ends, Penn Treebank's convention (an `<eos>` is predicted at
    the end of every line and counted as a word)."""
    scored = ~np.isnan(nll)
    total = float(np.sum(nll[scored]))
    tokens = int(scored.sum())
    num_bytes = int(np.sum(np.asarray(byte_lengths)[np.asarray(token_ids)[scored]]))
    num_words, num_lines = len(text.split()), text.count("\n")
    return {
        "ppl": math.exp(min(total / max(tokens, 1), 700.0)),
        "bpb": total / math.log(2) / max(num_bytes, 1),
        "word_ppl": math.exp(min(total / max(num_words, 1), 700.0)),
        "word_ppl_eos": math.exp(min(total / max(num_words + num_lines, 1), 700.0)),
        "tokens": tokens,
        "loss": total / max(tokens, 1),
        "nll": total,
        "bytes": num_bytes,
        "words": num_words,
        "line_ends": num_lines,
    }


def default_window(loaded: LoadedModel, window: int | None, stride: int | None) -> tuple[int, int]:
    """The window (default: the model's whole context plus the last target) and stride (default: half of it)."""
    window = window or loaded.model_cfg.max_seq_len + 1
    return window, stride or max(1, (window - 1) // 2)


def text_perplexity(loaded: LoadedModel, text: str, window: int | None = None,
                    stride: int | None = None, batch_size: int = 0) -> dict:
    """Perplexity metrics of `text` (tokenized as one document, no BOS added) under a loaded model."""
    window, stride = default_window(loaded, window, stride)
    token_ids = text_lib.encode_array(loaded.tokenizer, text)
    nll = token_nll(loaded, token_ids, window, stride, batch_size)
    metrics = perplexity_metrics(nll, token_ids, loaded.tokenizer.token_byte_lengths(), text)
    return {**metrics, "window": window, "stride": stride, "model": loaded.name}


def split_perplexity(loaded: LoadedModel, split: str = "val", data_path: str = "",
                     window: int | None = None, stride: int | None = None, batch_size: int = 0) -> dict:
    """Perplexity metrics of a split (`train` or `val`) of the model's own data, or of the data prepared by
    `tools/prepare_data.py` in `data_path` (its documents joined with EOS; it must use the model's tokenizer)."""
    if split not in ("train", "val"):
        raise UserError(f"--split={split!r} must be train or val")
    if loaded.config is None and not data_path:
        raise UserError(f"{loaded.name} carries no data config: name the prepared data with --data")
    config = copy.deepcopy(loaded.config) if loaded.config is not None else config_lib.base_config()
    where = data_path or "the model's data"
    if data_path:
        config.data.path, config.data.text_files = data_path, ""
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        if not data_path:  # plain text is read with the model's tokenizer, never a newly trained one
            loaded.tokenizer.save(tokenizer_dir)
        source = data_lib.load_data(config, tokenizer_dir)
        token_ids = _split_tokens(source, split)
    tokenizer = source.tokenizer
    if not _same_tokenizer(tokenizer, loaded.tokenizer, tokenizer.decode(token_ids[:256])):
        raise UserError(f"the data in {where} was tokenized with another tokenizer than {loaded.name}'s")
    window, stride = default_window(loaded, window, stride)
    nll = token_nll(loaded, token_ids, window, stride, batch_size)
    metrics = perplexity_metrics(nll, token_ids, tokenizer.token_byte_lengths(), tokenizer.decode(token_ids))
    return {**metrics, "window": window, "stride": stride, "model": loaded.name, "split": split,
            "data": data_path or None}


def _same_tokenizer(data_tokenizer, model_tokenizer, probe: str) -> bool:
    """Whether the data's tokenizer is the model's: the same vocabulary size and the same ids for `probe` (a piece
    of the data, so the data's tokenizer can encode it)."""
    if data_tokenizer.vocab_size != model_tokenizer.vocab_size:
        return False
    try:
        return list(data_tokenizer.encode(probe)) == list(model_tokenizer.encode(probe))
    except UserError:  # a character the vocabulary lacks
        return False


def _split_tokens(source, split: str) -> np.ndarray:
    """A split's tokens: plain text's as tokenized, prepared shards' documents in order joined with EOS."""
    if hasattr(source, f"{split}_tokens"):
        return getattr(source, f"{split}_tokens")
    from gpt_jax.data import shards

    paths = [os.path.join(source.path, s["path"]) for s in source.shards[split]]
    tokens, lengths = shards.read_documents(paths)
    if not len(lengths):
        raise UserError(f"{source.path} has no {split} documents")
    return shards.join_documents(tokens, lengths, np.arange(len(lengths)), source.eos_id)


# ----------------------------------------------------------------------------------------------------------------
# Generation tasks

TRANSLATE_TEMPLATE = "English: {source}\nGerman:"
GSM8K_TEMPLATE = "Question: {question}\nAnswer:"
GSM8K_STOPS = ("\n\n", "\nQuestion:")


def generate(loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int,
             stops: Sequence[str] = ("\n",), batch_size: int = 8, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continues each prompt (greedy at temperature 0), `batch_size` at a time; each continuation is cut before the
    first of `stops`."""
    from gpt_jax import decode

    tok = loaded.tokenizer
    states = decode.generate(loaded.model, loaded.model_cfg, [decode.encode_prompt(tok, p) for p in prompts],
                             max_new_tokens, decode.SamplingParams(temperature), seed=seed, eos_id=tok.eos_id,
                             max_batch=batch_size, tokenizer=tok, stops=stops)
    return [s.text for s in states]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of `stops`."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenization), as its command line computes them;
    `references` holds one list of lines per reference set."""
    import sacrebleu

    for refs in references:
        if len(refs) != len(hypotheses):
            raise UserError(f"{len(hypotheses)} hypotheses but a reference set of {len(refs)} lines")
    bleu_metric, chrf_metric = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu_score = bleu_metric.corpus_score(list(hypotheses), [list(r) for r in references])
    chrf_score = chrf_metric.corpus_score(list(hypotheses), [list(r) for r in references])
    return {"bleu": bleu_score.score, "chrf": chrf_score.score, "sentences": len(hypotheses),
            "bleu_signature": str(bleu_metric.get_signature()), "chrf_signature": str(chrf_metric.get_signature())}


def translate(loaded: LoadedModel, sources: Sequence[str], template: str = TRANSLATE_TEMPLATE,
              prefix: str = "", max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy translations of `sources`: each prompt is `prefix` (e.g. few-shot examples) + template filled with
    {source}; a translation ends at the first newline."""
    prompts = [prefix + template.format(source=s) for s in sources]
    return [h.strip() for h in generate(loaded, prompts, max_new_tokens, ("\n",), batch_size)]


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> decimal.Decimal | None:
    """A number written as in GSM8K answers ("1,200", "$5", "3.50") as a Decimal; None if it is not one."""
    try:
        return decimal.Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except decimal.InvalidOperation:
        return None


def extract_answer(text: str, strict: bool = True) -> decimal.Decimal | None:
    """The number after the first `####` in `text`; with strict=False, the last number in the text when there is
    no `####`. None when there is none."""
    if "####" in text:
        match = _NUMBER.search(text.split("####", 1)[1])
        return parse_number(match.group()) if match else None
    if strict:
        return None
    matches = _NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """GSM8K-style accuracy: the number after `####` in a prediction equals the one in its reference answer
    (`exact_match`); `exact_match_flexible` falls back to a prediction's last number."""
    if len(predictions) != len(answers):
        raise UserError(f"{len(predictions)} predictions but {len(answers)} answers")
    golds = [extract_answer(a) for a in answers]
    strict = [g is not None and extract_answer(p) == g for p, g in zip(predictions, golds, strict=True)]
    flexible = [g is not None and extract_answer(p, strict=False) == g for p, g in zip(predictions, golds, strict=True)]
    n = max(len(answers), 1)
    return {"exact_match": sum(strict) / n, "exact_match_flexible": sum(flexible) / n, "examples": len(answers)}


def gsm8k(loaded: LoadedModel, examples: Sequence[dict], template: str = GSM8K_TEMPLATE,
          prefix: str = "", max_new_tokens: int = 256, batch_size: int = 8) -> tuple[dict, list[str]]:
    """Generates an answer per example ({"question", "answer"}) and scores exact match; returns (metrics,
    generated answers)."""
    prompts = [prefix + template.format(question=ex["question"]) for ex in examples]
    predictions = generate(loaded, prompts, max_new_tokens, GSM8K_STOPS, batch_size)
    return exact_match(predictions, [ex["answer"] for ex in examples]), predictions


# ----------------------------------------------------------------------------------------------------------------
# Reports


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table with one row per dict; `columns` defaults to every key in first-seen order. Floats get
    four decimals, missing values stay empty."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def evaluate_workdir(config, workdir: str) -> dict:
    """Evaluates the latest checkpoint in `workdir` (or `config.init_from` when it has none) on the whole
    validation split of the config's data; an encoder-decoder adds BLEU and chrF of its greedy translations of the
    validation sources (val_hypotheses.txt), and of beam search's when `eval.beam_size` > 1. The weights are
    stored as config.model.param_dtype and quantize say (`workdir.with_weights`). Writes eval.json and eval.md,
    returns the results. Decoder-only data is tokenized with the model's own tokenizer: one from `init_from` is
    saved to `workdir/tokenizer` when that holds none, and a different tokenizer there is an error."""
    has_model = os.path.isfile(workdir_lib.path(workdir, workdir_lib.CONFIG)) and \
        (workdir_lib.has_checkpoint(workdir) or not config.init_from)
    loaded = workdir_lib.load(workdir if has_model else (config.init_from or workdir),
                              (config.model.param_dtype, config.model.quantize))
    tokenizer_dir = workdir_lib.tokenizer_dir(workdir)
    encdec = loaded.config.model.kind == "encoder_decoder"
    if not encdec and not os.path.isfile(os.path.join(tokenizer_dir, tokenizer_lib.TOKENIZER_JSON)):
        loaded.tokenizer.save(tokenizer_dir)  # never a tokenizer trained on the evaluation data
    data = data_lib.load_data(config, tokenizer_dir)
    seq_len = config.seq_len if encdec else min(config.seq_len, loaded.model_cfg.max_seq_len)
    batches = data.val_batches(config.batch_size, seq_len)
    if not encdec:
        probe = data.tokenizer.decode(batches[0]["tokens"][0][:256]) if batches else ""
        if not _same_tokenizer(data.tokenizer, loaded.tokenizer, probe):
            raise UserError(f"{tokenizer_dir} holds another tokenizer than {loaded.name}'s: evaluate into a new "
                            "workdir")
    graphdef, params = nnx.split(loaded.model, nnx.Param)
    eval_step = jax.jit(steps.make_eval_step(graphdef, data.tokenizer.token_byte_lengths(),
                                             loss_chunk=config.loss_chunk))
    results = evaluate_batches(eval_step, nnx.to_pure_dict(params), batches)
    results.update({"step": loaded.step, "seq_len": seq_len, "model": loaded.name})
    if encdec:
        limit = config.eval.limit or None
        results.update(translation_scores(loaded, data.val_sources[:limit], data.val_targets[:limit],
                                          workdir_lib.path(workdir, "val_hypotheses.txt"), config.eval.beam_size,
                                          config.eval.length_penalty))
    os.makedirs(workdir, exist_ok=True)
    with open(workdir_lib.path(workdir, workdir_lib.EVAL_JSON), "w") as f:
        json.dump(results, f, indent=2)
    columns = ["model", "step", "val_loss", "val_ppl", "val_bpb", "val_tokens", "seq_len"]
    with open(workdir_lib.path(workdir, workdir_lib.EVAL_MD), "w") as f:
        f.write(markdown_table([results], columns + (["bleu", "chrf", "beam_bleu", "beam_chrf"] if encdec else [])))
    return results
