"""Writes lm-evaluation-harness task YAMLs and their JSONL data into a folder (for --include_path), built from the
data beside the repository (../shared/data, or --data_dir); nothing is copied into the repository.

    python experiments/lm_eval_smollm2/make_tasks.py --out=/tmp/lm_eval_tasks [--data_dir=../shared/data]

Without the shared data (a clone of the repository alone) it writes the two tasks made here.

Tasks:
- ptb_lastword (loglikelihood; acc, perplexity): the last word of PTB validation sentences given the rest, as
  LAMBADA is scored: sentences of 8-30 words without `<unk>` or the `N` number token.
- ptb_rolling (loglikelihood_rolling; word_perplexity, byte_perplexity, bits_per_byte): PTB validation sentences
  scored whole.
- gsm8k_train (generate_until; exact_match after lm-eval's gsm8k filters): GSM8K training questions, 5-shot from
  other training questions, "Question: ...\\nAnswer:" as lm-eval's gsm8k task prompts.
- made_lastword, made_choice: short sentences this file writes itself (what compare_backends.py runs).
"""

from __future__ import annotations

import json
import os

from absl import flags

from gpt_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OUT = flags.DEFINE_string("out", "/tmp/lm_eval_tasks", "folder to write the task YAMLs and data into")
_DATA = flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data"), "the shared data folder")
_DOCS = flags.DEFINE_integer("docs", 200, "documents per PTB task; GSM8K takes 100 questions and 100 few-shot ones")

LASTWORD = {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' ' + text.split(' ')[-1]}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
ROLLING = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
           "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False}
                           for m, a in (("word_perplexity", "weighted_perplexity"),
                                        ("byte_perplexity", "weighted_perplexity"),
                                        ("bits_per_byte", "bits_per_byte"))]}
CHOICE = {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{label}}",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                          {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
GSM8K = {"output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:",
         "doc_to_target": "{{answer}}", "fewshot_split": "train", "num_fewshot": 5, "target_delimiter": " ",
         "fewshot_delimiter": "\n\n",
         "generation_kwargs": {"until": ["Question:", "\n\n"], "do_sample": False, "temperature": 0.0,
                               "max_gen_toks": 256},
         "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                          "ignore_case": True, "ignore_punctuation": False,
                          "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
         "filter_list": [{"name": "strict-match", "filter": [
                              {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                              {"function": "take_first"}]},
                         {"name": "flexible-extract", "filter": [
                              {"function": "regex", "group_select": -1,
                               "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                              {"function": "take_first"}]}]}

# made here: facts a small model should know, and four choices each (the first is right)
FACTS = [
    ("The capital of France is", "Paris", ["Berlin", "Madrid", "Rome"]),
    ("The capital of Germany is", "Berlin", ["Paris", "Vienna", "Warsaw"]),
    ("The capital of Italy is", "Rome", ["Milan", "Paris", "Athens"]),
    ("The capital of Japan is", "Tokyo", ["Beijing", "Seoul", "Osaka"]),
    ("The capital of Spain is", "Madrid", ["Lisbon", "Barcelona", "Rome"]),
    ("The largest planet in the solar system is", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("Water freezes at zero degrees", "Celsius", ["Kelvin", "Fahrenheit", "Rankine"]),
    ("The chemical symbol for gold is", "Au", ["Ag", "Fe", "Gd"]),
    ("A week has seven", "days", ["hours", "months", "years"]),
    ("The opposite of hot is", "cold", ["warm", "big", "fast"]),
    ("Bees make", "honey", ["milk", "silk", "wax"]),
    ("The sun rises in the", "east", ["west", "north", "south"]),
    ("Two plus two equals", "four", ["three", "five", "six"]),
    ("The color of the clear sky is", "blue", ["green", "red", "yellow"]),
    ("Cats like to chase", "mice", ["cars", "clouds", "books"]),
    ("The first month of the year is", "January", ["March", "June", "December"]),
    ("Ice is frozen", "water", ["milk", "oil", "sand"]),
    ("A triangle has three", "sides", ["wheels", "legs", "colors"]),
    ("Shakespeare wrote the play Romeo and", "Juliet", ["Hamlet", "Othello", "Macbeth"]),
    ("The Pacific is the largest", "ocean", ["desert", "forest", "river"]),
]


def _write(out: str, name: str, records: list[dict], config: dict, split: str = "test",
           extra: dict[str, list[dict]] | None = None) -> None:
    files = {split: os.path.join(out, f"{name}.jsonl")}
    for other, rows in (extra or {}).items():
        files[other] = os.path.join(out, f"{name}.{other}.jsonl")
        _jsonl(files[other], rows)
    _jsonl(files[split], records)
    with open(os.path.join(out, f"{name}.yaml"), "w") as f:
        json.dump({"task": name, "dataset_path": "json", "test_split": split, "metadata": {"version": 1.0},
                   "dataset_kwargs": {"data_files": files, "cache_dir": os.path.join(out, "hf_cache")}, **config},
                  f, indent=1)  # JSON is YAML


def _jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def made_tasks(out: str) -> None:
    """made_lastword and made_choice, from FACTS."""
    os.makedirs(out, exist_ok=True)
    _write(out, "made_lastword", [{"text": f"{prefix} {answer}"} for prefix, answer, _ in FACTS], LASTWORD)
    _write(out, "made_choice", [{"question": prefix, "choices": [answer, *wrong], "label": 0}
                                for prefix, answer, wrong in FACTS], CHOICE)


def main(argv):
    del argv
    out, data, n = _OUT.value, _DATA.value, _DOCS.value
    made_tasks(out)
    if not os.path.isfile(os.path.join(data, "ptb", "ptb.valid.txt")):
        print(f"wrote made_lastword, made_choice into {out} ({data} has no PTB and GSM8K data for the other tasks)")
        return
    with open(os.path.join(data, "ptb", "ptb.valid.txt")) as f:
        sentences = [" ".join(line.split()) for line in f]
    clean = [s for s in sentences if 8 <= len(s.split()) <= 30 and "<unk>" not in s and " N " not in f" {s} "]
    _write(out, "ptb_lastword", [{"text": s} for s in clean[:n]], LASTWORD)
    _write(out, "ptb_rolling", [{"text": s} for s in sentences[:n] if s], ROLLING)
    with open(os.path.join(data, "gsm8k", "train.jsonl")) as f:
        problems = [json.loads(line) for line in f][:200]
    _write(out, "gsm8k_train", problems[:100], GSM8K, extra={"train": problems[100:200]})
    print(f"wrote made_lastword, made_choice, ptb_lastword ({min(n, len(clean))}), ptb_rolling, gsm8k_train (100) "
          f"into {out}")


if __name__ == "__main__":
    cli.run(main)
