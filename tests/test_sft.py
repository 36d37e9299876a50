"""Supervised fine-tuning data: the loss mask covers exactly the response (assistant) tokens, batches resume, and a
tiny model trains on chat records with a masked validation loss."""

import json
import os

import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import tokenizer as tokenizer_lib
from gpt_jax.data import load_data, sft
from gpt_jax.errors import DataError

# SmolLM2-Instruct's template (ChatML with a default system prompt), as its GGUF carries it
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "Berlin, of course."}]


@pytest.fixture
def chat_tokenizer(tiny_bpe):
    """The tiny byte-level BPE with ChatML's special tokens and SmolLM2's chat template."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tiny_bpe.to_str())
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tokenizer_lib.HFTokenizer(tok, eos_id=tok.token_to_id("<|im_end|>"), chat_template=SMOL_TEMPLATE)


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_loss_mask_covers_exactly_the_response_tokens(chat_tokenizer):
    tok = chat_tokenizer
    pair = [{"role": "user", "content": "Paris is the capital of France?"},
            {"role": "assistant", "content": "Yes. 42 engineers agree!"}]
    ids, is_target = sft.tokenize_chat(tok, pair)
    prompt = sft.render_chat(tok, pair[:1], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(ids) == sft.render_chat(tok, pair)
    assert tok.decode(ids[is_target]) == "Yes. 42 engineers agree!<|im_end|>"
    assert tok.decode(ids[~is_target]) == prompt + "\n"
    # the targets are one contiguous run: the response's own tokens then <|im_end|>
    first = int(np.argmax(is_target))
    n = int(is_target.sum())
    assert is_target[first:first + n].all() and ids[first + n - 1] == tok.eos_id
    assert list(ids[first:first + n - 1]) == tok.encode("Yes. 42 engineers agree!")

    ids, is_target = sft.tokenize_chat(tok, CHAT)  # several turns: every assistant turn, nothing else
    assert tok.decode(ids) == sft.render_chat(tok, CHAT)
    assert tok.decode(ids[is_target]) == "Paris.<|im_end|>Berlin, of course.<|im_end|>"
    assert "You are a helpful" not in tok.decode(ids)  # a system message replaces the default one


def test_batches_shift_the_mask_to_targets_and_resume(tmp_path, chat_tokenizer):
    records = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.\n#### {2 * i}"} for i in range(20)]
    long_chat = CHAT + [{"role": "user", "content": "Tell me more."},
                        {"role": "assistant", "content": "Berlin is the capital of Germany. " * 20}]
    records.append({"messages": long_chat})
    config = config_lib.base_config()
    config.data.sft_file = write_jsonl(tmp_path / "train.jsonl", records)
    config.data.sft_prompt_field, config.data.sft_response_field = "question", "answer"
    config.data.val_fraction = 0.2
    chat_tokenizer.save(str(tmp_path / "tok"))
    source = load_data(config, str(tmp_path / "tok"))
    assert isinstance(source, sft.SFTSource)
    assert len(source.train_examples) == 17 and len(source.val_examples) == 4

    seq_len = max(len(ids) for ids, _ in source.train_examples[:-1]) - 1  # the pairs fit, the chat is cut
    assert len(sft.tokenize_chat(chat_tokenizer, long_chat)[0]) > seq_len + 1
    tokens, masks, truncated = source.rows("train", seq_len)
    assert tokens.shape == (17, seq_len + 1) and masks.shape == (17, seq_len) and truncated == 1
    for (ids, is_target), row, mask in zip(source.train_examples, tokens, masks, strict=True):
        n = min(len(ids), seq_len + 1)
        np.testing.assert_array_equal(row[:n], ids[:n])
        assert (row[n:] == chat_tokenizer.eos_id).all()  # padding
        np.testing.assert_array_equal(mask[:n - 1], is_target[1:n])  # mask[j] says whether target j+1 counts
        assert not mask[n - 1:].any()
    assert chat_tokenizer.decode(tokens[0][1:][masks[0] > 0]) == "It is 0.\n#### 0<|im_end|>"
    np.testing.assert_array_equal(source.val_loss_masks(seq_len), source.rows("val", seq_len)[1])

    batches = source.train_batches(4, seq_len, seed=3)
    seen = [next(batches) for _ in range(6)]  # crosses an epoch (4 batches of 4 out of 17 rows)
    assert seen[0]["tokens"].shape == (4, seq_len + 1) and seen[0]["loss_mask"].shape == (4, seq_len)
    resumed = source.train_batches(4, seq_len, seed=3, state={"batch_index": 3})
    for expected in seen[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], expected["tokens"])
        np.testing.assert_array_equal(got["loss_mask"], expected["loss_mask"])
    halves = [next(source.train_batches(4, seq_len, seed=3, process_index=p, process_count=2)) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), seen[0]["tokens"])


def test_bad_records_are_named(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "only"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'response'"):
        sft.read_records(path)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no assistant message"):
        sft.read_records(path)
    (tmp_path / "broken.jsonl").write_text('\n{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:3: not valid JSON"):
        sft.read_records(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DataError, match="cannot read data.sft_file .*missing.jsonl"):
        sft.read_records(str(tmp_path / "missing.jsonl"))


def test_sft_trains_a_tiny_model_on_responses_only(tmp_path):
    from gpt_jax import evaluate, train

    records = [{"prompt": f"Add {a} and {b}.", "response": f"{a} + {b} = {a + b}"}
               for a in range(12) for b in range(12)]
    config = config_lib.base_config()
    config.data.sft_file = write_jsonl(tmp_path / "add.jsonl", records)
    config.data.val_fraction = 0.1
    config.train_steps, config.batch_size, config.seq_len = 30, 8, 96
    config.learning_rate, config.min_learning_rate, config.warmup_steps = 1e-2, 1e-3, 5
    config.model.n_layer, config.model.d_model, config.model.n_head = 1, 32, 2
    config.eval_every, config.eval_steps, config.log_every, config.checkpoint_every = 0, 2, 1, 0
    config.sample.max_new_tokens = 0
    result = train.train_and_evaluate(config, str(tmp_path / "run"))

    source = load_data(config, str(tmp_path / "run" / "tokenizer"))  # the char tokenizer the run saved
    # the final evaluation counted response targets only: the "{a} + {b} = {sum}" characters and <|im_end|>
    assert result["val_tokens"] == int(source.val_loss_masks(96).sum())
    assert result["val_tokens"] == sum(len(f"{r['response']}{sft.CHATML_END}") for r in _val_records(records))
    # --mode=eval scores the same response targets as the training loop's final evaluation
    run_config = config_lib.from_json_file(str(tmp_path / "run" / "config.json"))
    evaluated = evaluate.evaluate_workdir(run_config, str(tmp_path / "run"))
    assert evaluated["val_tokens"] == result["val_tokens"]
    assert evaluated["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        losses = [json.loads(line)["train_loss"] for line in f if "train_loss" in line]
    assert losses[-1] < losses[0] - 1.0


def _val_records(records):
    order = np.random.default_rng(sft.SPLIT_SEED).permutation(len(records))
    n_val = int(round(len(records) * 0.1))
    return [records[i] for i in order[:n_val]]


@pytest.mark.slow
def test_smollm2_template_masks_the_gsm8k_answer(smollm2_gguf):
    from gpt_jax.convert.gguf_import import gguf_tokenizer, open_gguf

    tok = gguf_tokenizer(open_gguf(smollm2_gguf), smollm2_gguf)
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    ids, is_target = sft.tokenize_chat(tok, [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}])
    expected_prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                       f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[~is_target]) == expected_prompt + "\n"
    assert tok.decode(ids[is_target]) == answer + "<|im_end|>"
    assert ids[is_target][-1] == tok.eos_id == 2 and list(ids[:1]) == [1]  # <|im_end|> ends it, <|im_start|> opens
    assert list(ids[is_target][:-1]) == tok.encode(answer)
