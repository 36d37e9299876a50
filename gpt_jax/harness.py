"""EleutherAI's lm-evaluation-harness (`lm-eval`) over gpt_jax models, in process.

    python tools/evaluate.py harness --model=PATH --tasks=T1,T2 [--include_path=DIR] [--limit=N] ...

`GptJaxLM` is an lm_eval model (registered as `gpt_jax`) over a gpt_jax workdir, an HF directory or a GGUF file
(anything `workdir.load` takes) or a model already in memory (training-time evaluation):
- `loglikelihood` (and multiple choice) and `loglikelihood_rolling` score batches of token sequences in one forward
  pass each, sharded over a mesh of the local devices (batch over `data`, parameters by the logical-axis rules),
  at a few padded lengths (powers of two) so few shapes compile. A continuation counts as greedy when each of its
  tokens' log-probability is the largest at its position, as the server's `top_logprobs` tell lm-eval's
  `local-completions` client.
- `generate_until` decodes greedily (or samples, as a task's `do_sample` asks) on `decode.Engine`, batched, cut at
  the task's `until` strings and the end token.

Sequences follow lm-eval's HF backend: no BOS unless the model's tokenizer adds one (`add_bos_token` overrides),
contexts cut from the left to fit `max_length` (the model's context), rolling windows of `max_length` tokens.
The same model through `python -m gpt_jax.main --mode=serve` and lm-eval's `local-completions` gives the same
numbers (tests/test_harness.py).

`evaluate` runs tasks and returns, per task, its metrics by name (`acc`, `perplexity`, `exact_match,strict-match`).
lm-eval's bootstrapped standard errors run in this process (`DISABLE_MULTIPROC`): forking a process that runs JAX
can deadlock.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence

os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap: no worker processes forked from JAX's

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_eval.models  # noqa: E402, F401  (lm-eval's own models first: it loads them only into an empty registry)
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from gpt_jax import decode, sharding  # noqa: E402
from gpt_jax import tokenizer as tokenizer_lib  # noqa: E402
from gpt_jax import workdir as workdir_lib  # noqa: E402
from gpt_jax.errors import UserError  # noqa: E402

SMALLEST_WIDTH = 16  # padded sequence lengths are powers of two from this up to the context


@register_model("gpt_jax")
class GptJaxLM(TemplateLM):
    """An lm_eval model over a gpt_jax model. `model`: a path `workdir.load` takes, or a `LoadedModel`;
    `batch_size`: sequences per forward pass (and prompts decoded together); `max_length`: tokens per sequence
    (default: the model's context); `max_gen_toks`: tokens to generate when a task does not say; `mesh`: where to
    shard the scoring (default: every local device on `data`)."""

    def __init__(self, model: str | workdir_lib.LoadedModel = "", batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256,
                 add_bos_token: bool | str | None = None, seed: int | str = 1234, mesh=None, pretrained: str = "",
                 **unused):
        super().__init__()
        source = model or pretrained
        if not source:
            raise UserError("the gpt_jax lm_eval model needs model=PATH (a workdir, HF directory or .gguf file)")
        loaded = source if isinstance(source, workdir_lib.LoadedModel) else workdir_lib.load(source)
        if loaded.config is not None and loaded.config.model.kind == "encoder_decoder":
            raise UserError(f"{loaded.name} is an encoder-decoder: lm-evaluation-harness needs a decoder-only model")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else max(int(batch_size), 1)
        context = loaded.model_cfg.max_seq_len
        self.max_length = min(int(max_length), context) if max_length else context
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        if isinstance(add_bos_token, str):
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        bos = getattr(self.tokenizer, "bos_id", None)
        self.add_bos = bos is not None and (getattr(self.tokenizer, "add_bos", False) if add_bos_token is None
                                            else add_bos_token)
        self.mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1},
                                                                     jax.local_devices())
        rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.rows = -(-self.batch_size // rows) * rows  # each forward pass's batch divides over the mesh
        graphdef, params = nnx.split(loaded.model, nnx.Param)
        param_shardings = sharding.param_shardings(loaded.model, self.mesh)
        self.params = jax.device_put(nnx.to_pure_dict(params), param_shardings)
        batch_sharding = sharding.batch_sharding(self.mesh)
        self._score = jax.jit(_scorer(graphdef), in_shardings=(param_shardings, batch_sharding, batch_sharding),
                              out_shardings=(batch_sharding, batch_sharding))

    # -- what lm_eval asks of a model ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        return eos if eos is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling window's first) conditions on: BOS, else the end token."""
        for name in ("bos_id", "eos_id"):
            if getattr(self.tokenizer, name, None) is not None:
                return getattr(self.tokenizer, name)
        return 0

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        rendered = tokenizer_lib.apply_chat_template(self.tokenizer, chat_history, add_generation_prompt)
        if rendered is None:
            raise UserError(f"{self.loaded.name}'s tokenizer has no chat template")
        return rendered

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(string))
        if (self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos) \
                and ids[:1] != [self.tokenizer.bos_id]:
            ids.insert(0, self.tokenizer.bos_id)
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether each of its tokens is the most likely one) per request
        ((context, continuation) strings or None, context ids, continuation ids)."""
        sequences = []
        for _, context, continuation in requests:
            continuation = list(continuation)[-self.max_length:]
            tokens = (list(context) + continuation)[-(self.max_length + 1):]  # cut from the left, as lm-eval's HF
            sequences.append((tokens, len(continuation)))
        results = self.score(sequences, progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:  # (a rolling window has none; its whole text is cached)
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in windows of `max_length` tokens, each token predicted once, the first from
        `prefix_token_id` (lm-eval's rolling windows, as its HF backend lays them)."""
        from lm_eval import utils as lm_utils

        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, predicted in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((context + predicted, len(predicted)))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self.score(windows, progress=not disable_tqdm), strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut before the first of the task's `until` strings (and the end token),
        greedy unless the task samples; requests with the same generation settings are decoded together."""
        from lm_eval.models.utils import handle_stop_sequences

        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out: list[str] = [""] * len(requests)
        eos_id = getattr(self.tokenizer, "eos_id", None)
        eos = None if eos_id is None else self.tokenizer.decode([eos_id])
        for members in groups.values():
            kwargs = copy.deepcopy(requests[members[0]].args[1])
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos) if s]
            max_gen_toks = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            room = self.max_length - max_gen_toks
            if room < 1:
                raise UserError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                                f"{self.max_length} tokens")
            temperature = float(kwargs.get("temperature", 1.0) or 0.0) if kwargs.get("do_sample", False) else 0.0
            sampling = decode.SamplingParams(temperature, int(kwargs.get("top_k", 0) or 0),
                                             float(kwargs.get("top_p", 1.0) or 1.0))
            prompts = [self.tok_encode(requests[n].args[0])[-room:] or [self.prefix_token_id] for n in members]
            states = decode.generate(self.loaded.model, self.loaded.model_cfg, prompts, max_gen_toks, sampling,
                                     seed=self.seed, eos_id=eos_id,
                                     max_batch=self.batch_size, tokenizer=self.tokenizer, stops=until)
            for n, state in zip(members, states, strict=True):
                out[n] = state.text
                self.cache_hook.add_partial("generate_until", requests[n].args, state.text)
        return out

    # -- scoring ---------------------------------------------------------------------------------------------

    def score(self, sequences: Sequence[tuple[list[int], int]], progress: bool = False) -> list[tuple[float, bool]]:
        """Per (tokens, n): the summed log-probability of the last n tokens given those before them, and whether
        each of them is the most likely token at its position. Sequences hold at most `max_length` + 1 tokens;
        they are scored longest first, `batch_size` at a time, padded at the end to a power of two."""
        from tqdm import tqdm

        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        bar = tqdm(total=len(sequences), desc="Scoring", disable=not progress)
        with jax.set_mesh(self.mesh), bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                longest = len(sequences[batch[0]][0]) - 1
                width = min(max(SMALLEST_WIDTH, 1 << max(longest - 1, 0).bit_length()), self.max_length)
                inputs = np.zeros((self.rows, width), np.int32)
                targets = np.zeros((self.rows, width), np.int32)
                for row, i in enumerate(batch):
                    tokens = sequences[i][0]
                    inputs[row, :len(tokens) - 1] = tokens[:-1]
                    targets[row, :len(tokens) - 1] = tokens[1:]
                logprobs, greedy = (np.asarray(x) for x in self._score(self.params, inputs, targets))
                for row, i in enumerate(batch):
                    tokens, n = sequences[i]
                    span = slice(len(tokens) - 1 - n, len(tokens) - 1)
                    results[i] = (float(logprobs[row, span].sum()), bool(greedy[row, span].all()))
                bar.update(len(batch))
        return results


def _scorer(graphdef):
    def score(params, inputs, targets):
        """inputs, targets [batch, width] → (log-probability of each target, whether it is the most likely token)
        from one log-softmax of the float32 logits."""
        logits, _ = nnx.merge(graphdef, params)(inputs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return chosen, chosen >= jnp.max(logp, axis=-1)

    return score


# ----------------------------------------------------------------------------------------------------------------
# Running tasks


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's TaskManager for `tasks`: the tasks under `include_path` alone when they are all there (indexing
    lm-eval's own thousands of tasks takes tens of seconds), else those too. UserError naming a task that is
    nowhere."""
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path {include_path} is not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise UserError(f"unknown lm-eval task {missing[0]!r}" + (f" (not in lm-eval nor under {include_path})"
                                                                 if include_path else ""))
    return manager


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: `acc`, `perplexity`, ... (a filter other than `none` stays
    in the name: `exact_match,strict-match`); standard errors, aliases and document counts left out."""
    out = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or metric == "sample_len" or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            metrics[metric if filter_name in ("", "none") else key] = float(value)
        out[task] = metrics
    return out


def evaluate(model: str | workdir_lib.LoadedModel | GptJaxLM, tasks: Sequence[str], *, include_path: str | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
             output_path: str | None = None, bootstrap_iters: int = 0, **model_args) -> tuple[dict, dict]:
    """Runs lm-eval's `tasks` on a model (a path, a LoadedModel or a GptJaxLM): returns ({task: {metric: value}},
    lm-eval's whole results). With `output_path`, lm-eval writes its results and every sample's there, as its
    command line does. bootstrap_iters > 0 adds bootstrapped standard errors."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("name at least one lm-eval task")
    manager = task_manager(tasks, include_path)
    lm = model if isinstance(model, GptJaxLM) else GptJaxLM(model, batch_size=batch_size, **model_args)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    results = simple_evaluate(model=lm, model_args={"model": lm.loaded.name or "gpt_jax"},  # (names the output)
                              tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=bool(output_path),
                              evaluation_tracker=tracker, torch_random_seed=None)
    if results is None:
        raise UserError("lm-eval returned no results")
    if tracker is not None:
        samples = results.pop("samples", {})
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results.get("configs", {}):
            if task in samples:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    return task_metrics(results), results


def finite_metrics(metrics: dict[str, dict[str, float]], prefix: str = "harness") -> dict[str, float]:
    """{f"{prefix}/{task}/{metric}": value} for logging, finite values only."""
    return {f"{prefix}/{task}/{name}": value for task, values in metrics.items() for name, value in values.items()
            if math.isfinite(value)}
