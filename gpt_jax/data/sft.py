"""Supervised fine-tuning data: chat records rendered with the model's chat template, one record per row, with a
loss mask that is 1 exactly on the response (assistant) tokens.

`data.sft_file` is JSONL; each line is either a prompt/response pair (field names `data.sft_prompt_field` and
`data.sft_response_field`, "prompt" and "response" by default; GSM8K's are "question" and "answer") or a chat,
{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}. A pair is the chat
[user: prompt, assistant: response].

A chat is rendered with the tokenizer's Jinja chat template (ChatML, `<|im_start|>role\\ncontent<|im_end|>\\n`,
when the tokenizer has none, e.g. a character tokenizer trained on the records). Each assistant turn's target is
what the template adds for it after the generation prompt (`<|im_start|>assistant\\n`): its content and its
end-of-turn marker, without trailing whitespace, so the model learns when to stop. Every other token (system and
user turns, role headers, padding) has loss mask 0.

Rows are `seq_len + 1` tokens: a longer record is cut at the end, a shorter one padded (mask 0). A fixed fraction
`data.val_fraction` of the records, chosen by a seeded shuffle independent of the run's seed, is held out for
validation. Batches are a pure function of (seed, batch index), so a resumed run sees the same batches.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import WindowSource, text
from gpt_jax.errors import DataError

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
SPLIT_SEED = 0  # the validation records do not move when the run's seed does


# ----------------------------------------------------------------------------------------------------------------
# Records and chat rendering


def read_records(path: str, prompt_field: str = "prompt", response_field: str = "response") -> list[list[dict]]:
    """The chats of a JSONL file: one list of {"role", "content"} messages per line (blank lines skipped).
    DataError naming the file, line and field for anything else."""
    chats = []
    for where, record in text.jsonl_records(path, "data.sft_file"):
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise DataError(f"{where}: messages must be a list of {{\"role\": str, \"content\": str}}")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: the chat has no assistant message to train on")
            chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
            continue
        for field in (prompt_field, response_field):
            if not isinstance(record.get(field), str):
                raise DataError(f"{where}: field {field!r} is missing or not a string (set "
                                "data.sft_prompt_field / data.sft_response_field, or use \"messages\")")
        chats.append([{"role": "user", "content": record[prompt_field]},
                      {"role": "assistant", "content": record[response_field]}])
    if not chats:
        raise DataError(f"data.sft_file {path} holds no record")
    return chats


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then `<|im_start|>assistant\\n` if asked."""
    turns = "".join(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return turns + (f"{CHATML_START}assistant\n" if add_generation_prompt else "")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` as text: with the tokenizer's chat template, or ChatML when it has none."""
    rendered = tokenizer_lib.apply_chat_template(tokenizer, messages, add_generation_prompt)
    return render_chatml(messages, add_generation_prompt) if rendered is None else rendered


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered chat cut into (text, is_target) pieces: each assistant turn's content and end-of-turn marker
    are targets; everything else (other turns, role headers, the separator after a turn) is not. Messages after
    the last assistant turn are left out."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[:i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render this conversation turn by turn (each rendering must "
                            f"extend the previous one), at message {i}")
        reply = full[len(prompt):]
        target = reply.rstrip()
        segments += [(prompt[len(done):], False), (target, True), (reply[len(target):], False)]
        done = full
    return [(piece, is_target) for piece, is_target in segments if piece]


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 [n], is_target bool [n]) of a chat under `tokenizer`'s chat template; a BOS token comes
    first when the tokenizer's model expects one (`add_bos`)."""
    ids: list[int] = []
    targets: list[bool] = []
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        targets.append(False)
    for piece, is_target in chat_segments(tokenizer, messages):
        encoded = tokenizer.encode(piece)
        ids.extend(encoded)
        targets.extend([is_target] * len(encoded))
    return np.asarray(ids, np.int32), np.asarray(targets, bool)


def make_rows(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows for training or evaluation: (tokens int32 [n, seq_len+1], loss_mask float32 [n, seq_len], number of
    records cut at seq_len+1). loss_mask[:, j] is 1 where target tokens[:, j+1] is a response token; records left
    with no response token after the cut are dropped."""
    width = seq_len + 1
    tokens = np.full((len(examples), width), pad_id, np.int32)
    masks = np.zeros((len(examples), seq_len), np.float32)
    truncated = 0
    for row, (ids, is_target) in enumerate(examples):
        n = min(len(ids), width)
        truncated += len(ids) > width
        tokens[row, :n] = ids[:n]
        masks[row, :n - 1] = is_target[1:n]
    keep = masks.any(axis=1)
    return tokens[keep], masks[keep], truncated


# ----------------------------------------------------------------------------------------------------------------
# The data source


class SFTSource(WindowSource):
    """Chat records for supervised fine-tuning, one per row; validation counts response tokens only.

    The tokenizer is the workdir's (from `init_from`) or, when it has none, one trained on the rendered records
    (`data.tokenizer`)."""

    def __init__(self, config, tokenizer_dir: str):
        d = config.data
        chats = read_records(d.sft_file, d.sft_prompt_field, d.sft_response_field)
        if len(chats) < 2:
            raise DataError(f"data.sft_file {d.sft_file} needs at least 2 records (training and validation)")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(chats))
        n_val = min(max(1, int(round(len(chats) * d.val_fraction))), len(chats) - 1)
        val_ids, train_ids = np.sort(order[:n_val]), np.sort(order[n_val:])
        if os.path.exists(os.path.join(tokenizer_dir, tokenizer_lib.TOKENIZER_JSON)):
            self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir)
        else:  # characters from every record, subwords from the training records
            texts = [render_chatml(chats[i]) for i in (range(len(chats)) if d.tokenizer == "char" else train_ids)]
            self.tokenizer = tokenizer_lib.train(d.tokenizer, texts, d.vocab_size, tokenizer_dir)
        self.train_examples = [tokenize_chat(self.tokenizer, chats[i]) for i in train_ids]
        self.val_examples = [tokenize_chat(self.tokenizer, chats[i]) for i in val_ids]
        eos = self.tokenizer.eos_id
        self.pad_id = eos if eos is not None else 0
        self._rows: dict = {}

    def rows(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens [n, seq_len+1], loss_mask [n, seq_len], records cut) of a split, cached per seq_len."""
        if (split, seq_len) not in self._rows:
            examples = self.train_examples if split == "train" else self.val_examples
            tokens, masks, truncated = make_rows(examples, seq_len, self.pad_id)
            if not len(tokens):
                raise DataError(f"no {split} record keeps a response token within seq_len={seq_len}")
            self._rows[split, seq_len] = tokens, masks, truncated
        return self._rows[split, seq_len]

    def train_batches(self, batch_size: int, seq_len: int, seed: int, state: dict | None = None,
                      process_index: int = 0, process_count: int = 1) -> SFTBatches:
        tokens, masks, _ = self.rows("train", seq_len)
        start = (state or {}).get("batch_index", 0)
        return SFTBatches(tokens, masks, batch_size, seed, start, process_index, process_count)

    def val_windows(self, seq_len: int) -> np.ndarray:
        return self.rows("val", seq_len)[0]

    def val_loss_masks(self, seq_len: int) -> np.ndarray:
        """loss_mask [n, seq_len] of `val_windows(seq_len)`: evaluation counts response tokens only."""
        return self.rows("val", seq_len)[1]


class SFTBatches:
    """Iterator of {"tokens": int32 [local_batch, seq_len+1], "loss_mask": float32 [local_batch, seq_len]}: each
    epoch visits the rows in a (seed, epoch)-seeded random order; `state()` is the position. With several
    processes each takes its own slice of every global batch."""

    def __init__(self, tokens: np.ndarray, masks: np.ndarray, batch_size: int, seed: int, start_batch: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if len(tokens) < batch_size:
            raise DataError(f"the SFT training split has {len(tokens)} records, fewer than batch_size={batch_size}")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
        self.tokens, self.masks, self.seed = tokens, masks, seed
        self.batch_size = batch_size
        self.local = batch_size // process_count
        self.lo = process_index * self.local
        self.batches_per_epoch = len(tokens) // batch_size
        self._next = start_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, i = divmod(self._next, self.batches_per_epoch)
        order = _permutation(self.seed, epoch, len(self.tokens))
        rows = order[i * self.batch_size + self.lo: i * self.batch_size + self.lo + self.local]
        self._next += 1
        return {"tokens": self.tokens[rows], "loss_mask": self.masks[rows]}

    def state(self) -> dict:
        return {"batch_index": self._next}


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
