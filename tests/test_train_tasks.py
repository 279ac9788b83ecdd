"""train.py end to end for sentence pairs, regression and multilabel, as a user runs it: GLUE-style TSV, JSONL
pairs, an STS-B-like CSV, multilabel JSONL and CSV, LoRA, --resume; bad data files (one line, exit 2, nothing
written); and learning on the real pretrained MiniLM (a pair task and a regression task; skipped without ../shared)."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_WORDS

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the top-level script)
from roberta_lite import Model, Tokenizer  # noqa: E402
from roberta_lite import data as D  # noqa: E402
from roberta_lite.tasks import TASKS  # noqa: E402

GOOD, BAD, FILLER = TINY_WORDS[:10], TINY_WORDS[10:20], TINY_WORDS[20:]
GENRES = ("action", "comedy", "drama")


# ---------------------------------------------------------------------------------------------- tiny data

def sentence(rng: random.Random, words=FILLER, n=(3, 8)) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(*n)))


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentence pairs from the tiny vocabulary: 'same' when both halves carry the same sentiment word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(GOOD + BAD), rng.choice(GOOD + BAD)
        rows.append({"sentence1": f"{sentence(rng)} {a}", "sentence2": f"{b} {sentence(rng)}",
                     "label": "same" if (a in GOOD) == (b in GOOD) else "different"})
    return rows


def score_rows(n: int, seed: int = 0) -> list[dict]:
    """STS-B-like: a 0-5 score, how many of its five words the second text keeps from the first."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = [rng.choice(TINY_WORDS) for _ in range(5)]
        keep = rng.randint(0, 5)
        b = a[:keep] + [rng.choice(TINY_WORDS) for _ in range(5 - keep)]
        rows.append({"text": " ".join(a), "text_pair": " ".join(b), "score": f"{keep:.1f}"})
    return rows


def genre_rows(n: int, seed: int = 0) -> list[dict]:
    """Multilabel: one to three genres per text."""
    rng = random.Random(seed)
    return [{"text": sentence(rng, TINY_WORDS), "label": sorted(rng.sample(GENRES, rng.randint(1, 3)))}
            for _ in range(n)]


def write_table(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    """A CSV, or a GLUE-style TSV (no quoting); multilabel lists become `action|comedy` cells."""
    cell = lambda v: D.MULTILABEL_SEPARATOR.join(v) if isinstance(v, list) else v  # noqa: E731
    with open(path, "w", newline="", encoding="utf-8") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        w = csv.writer(f, delimiter=delimiter, quoting=quoting, lineterminator="\n")
        w.writerow(list(rows[0]))
        w.writerows([[cell(v) for v in r.values()] for r in rows])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- running train.py

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def argv(base: Path, cache: Path, data: Path, out: Path, *more: str, epochs: int = 2) -> list[str]:
    """A small run's command line: one thread, fp32 (the same numbers on CPUs with and without bf16)."""
    return ["--data", str(data), "--output", str(out), "--model", str(base), "--cache-dir", str(cache),
            "--epochs", str(epochs), "--batch-size", "8", "--threads", "1", "--precision", "fp32", *more]


def run_train(capsys, *args: str | Path, epochs: int = 2) -> dict:
    """train.main as the command line calls it (arguments as `argv`'s); returns metrics.json."""
    out = Path(args[3])
    rc = train.main(argv(*args, epochs=epochs))
    assert rc == 0, capsys.readouterr().err[-3000:]
    return json.loads((out / "metrics.json").read_text())


def reload_and_score(model: Model, base: Path, ds: D.TextDataset) -> dict:
    """A loaded adapter's metrics on `ds`, in one batch."""
    tok = Tokenizer.from_pretrained(base)
    ids, mask = tok(ds.texts, ds.text_pairs, max_length=model.config.max_tokens)
    task = TASKS[model.active_head.task]
    with torch.no_grad():
        return task.metrics(model(ids, mask), task.label_tensor(ds.label_array()))


def check_run(metrics: dict, out: Path, kind: str, labels: list[str], epochs: int = 2) -> None:
    """metrics.json, adapter_config.json and the files of one finished run of task `kind`."""
    primary = TASKS[kind].primary
    keys = {"classification": ["accuracy"], "regression": ["pearson", "spearman", "mse"],
            "multilabel": ["micro_f1", "macro_f1", "exact_match"]}[kind]
    for k in keys + ["loss"]:
        assert np.isfinite(metrics[f"test_{k}"]), (k, metrics[f"test_{k}"])
        assert all(np.isfinite(h[f"val_{k}"]) for h in metrics["epochs"]), k
    assert metrics["task"] == kind and metrics["labels"] == labels
    assert len(metrics[f"val_{primary}"]) == epochs == len(metrics["epochs"])
    assert metrics[f"val_{primary}"] == [e[f"val_{primary}"] for e in metrics["epochs"]]
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    assert metrics[f"best_val_{primary}"] == best[f"val_{primary}"] == max(metrics[f"val_{primary}"])
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["task"] == kind and meta["labels"] == labels
    assert meta["num_labels"] == (1 if kind == "regression" else len(labels))
    assert not (out / "checkpoint").exists()


def check_reload(base: Path, out: Path, metrics: dict, val: D.TextDataset, test: D.TextDataset) -> None:
    """Model.from_pretrained(base).load_adapter(out) gives the run's head, the best epoch's validation metrics
    (the file holds the best epoch's weights, not the last's) and the run's test metrics."""
    model = Model.from_pretrained(base, dtype=torch.float32).load_adapter(out).eval()
    head = model.active_head
    assert head.task == metrics["task"] and head.labels == metrics["labels"]
    assert head.num_labels == (1 if metrics["task"] == "regression" else len(metrics["labels"]))
    assert (len(val), len(test)) == (metrics["examples"]["validation"], metrics["examples"]["test"])
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    for split, ds, expected in (("val", val, best), ("test", test, metrics)):
        for k, v in reload_and_score(model, base, ds).items():
            assert v == pytest.approx(expected[f"{split}_{k}"], rel=1e-4, abs=1e-5), (split, k)


def splits(base: Path, data: Path, cache: Path, **load) -> tuple[D.TextDataset, D.TextDataset, int]:
    """(validation split, test split, tokens in the training split) as train.py splits and tokenizes `data`."""
    train_ds, test_ds = D.load_data(str(data), seed=0, **load)
    train_ds, val_ds = D.train_val_split(train_ds, 0.05, seed=0)
    tok = Tokenizer.from_pretrained(base)
    seqs = D.tokenize_cached(train_ds.texts, tok, 128, cache=cache, text_pairs=train_ds.text_pairs)
    return val_ds, test_ds, sum(len(s) for s in seqs)


# ---------------------------------------------------------------------------------------------- end to end

def test_glue_tsv_pair_classification(tiny_roberta, cache, tmp_path, capsys):
    """sentence1<TAB>sentence2<TAB>label with --text-columns: both texts are trained on, label names kept."""
    data = write_table(tmp_path / "rte.tsv", pair_rows(100), delimiter="\t")
    out = tmp_path / "out"
    metrics = run_train(capsys, tiny_roberta, cache, data, out, "--text-columns", "sentence1,sentence2")
    check_run(metrics, out, "classification", ["different", "same"])
    val, test, pair_tokens = splits(tiny_roberta, data, cache, text_columns=("sentence1", "sentence2"))
    assert test.text_pairs is not None
    assert metrics["train_tokens"] == 2 * pair_tokens  # <s> A </s></s> B </s>, two epochs
    check_reload(tiny_roberta, out, metrics, val, test)


def test_jsonl_pairs_with_default_columns(tiny_roberta, cache, tmp_path, capsys):
    """A JSONL file with `text`/`text_pair` is a pair task without any column flag."""
    rows = [{"text": r["sentence1"], "text_pair": r["sentence2"], "label": r["label"]} for r in pair_rows(100, 1)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    metrics = run_train(capsys, tiny_roberta, cache, data, out)
    check_run(metrics, out, "classification", ["different", "same"])
    val, test, pair_tokens = splits(tiny_roberta, data, cache)
    assert metrics["train_tokens"] == 2 * pair_tokens
    check_reload(tiny_roberta, out, metrics, val, test)


def test_regression_csv_stsb_like(tiny_roberta, cache, tmp_path, capsys):
    """0-5 scores in a `score` column: a 1-output head, Pearson/Spearman/MSE, best epoch by Pearson."""
    data = write_table(tmp_path / "sts.csv", score_rows(100))
    out = tmp_path / "out"
    metrics = run_train(capsys, tiny_roberta, cache, data, out, "--task", "regression", "--label-column", "score")
    check_run(metrics, out, "regression", ["score"])
    val, test, _ = splits(tiny_roberta, data, cache, label_column="score", task="regression")
    assert test.labels == [float(r["score"]) for r in score_rows(100) if r["text"] in test.texts]
    check_reload(tiny_roberta, out, metrics, val, test)


def test_multilabel_jsonl_and_csv_train_identically(tiny_roberta, cache, tmp_path, capsys):
    """["action", "comedy"] in JSONL and action|comedy in a CSV are one dataset: the same run, bit for bit."""
    rows = genre_rows(100)
    runs = {}
    for name, data in (("jsonl", write_jsonl(tmp_path / "g.jsonl", rows)),
                       ("csv", write_table(tmp_path / "g.csv", rows))):
        out = tmp_path / name
        runs[name] = run_train(capsys, tiny_roberta, cache, data, out, "--task", "multilabel")
        check_run(runs[name], out, "multilabel", list(GENRES))
    for key in ("test_micro_f1", "test_macro_f1", "test_exact_match", "test_loss", "val_micro_f1", "train_tokens"):
        assert runs["jsonl"][key] == runs["csv"][key], key
    wj, wc = load_file(tmp_path / "jsonl" / "adapter.safetensors"), load_file(tmp_path / "csv" / "adapter.safetensors")
    assert wj.keys() == wc.keys() and all(torch.equal(wj[k], wc[k]) for k in wj)
    val, test, _ = splits(tiny_roberta, tmp_path / "g.jsonl", cache, task="multilabel")
    check_reload(tiny_roberta, tmp_path / "csv", runs["csv"], val, test)


def test_lora_pair_regression(tiny_roberta, cache, tmp_path, capsys):
    """--adapter lora: only LoRA factors on query/value and the head train; the file reloads as the same head."""
    data = write_table(tmp_path / "sts.csv", score_rows(100, seed=2))
    out = tmp_path / "out"
    metrics = run_train(capsys, tiny_roberta, cache, data, out, "--task", "regression", "--label-column", "score",
                        "--adapter", "lora", "--lora-r", "4", "--lora-targets", "query,value")
    check_run(metrics, out, "regression", ["score"])
    meta = json.loads((out / "adapter_config.json").read_text())
    assert metrics["adapter"]["kind"] == "lora" and metrics["adapter"]["r"] == 4
    assert meta["adapter"]["kind"] == "lora" and meta["adapter"]["r"] == 4
    assert sorted(meta["adapter"]["targets"]) == ["query", "value"]
    weights = load_file(out / "adapter.safetensors")
    hidden, layers = 32, 2
    lora = [k for k in weights if not k.startswith("head.")]
    assert lora and sum(weights[k].numel() for k in lora) == layers * 2 * 4 * (hidden + hidden)  # A: r x d, B: d x r
    assert metrics["trainable_parameters"] == sum(w.numel() for w in weights.values())
    val, test, _ = splits(tiny_roberta, data, cache, label_column="score", task="regression")
    check_reload(tiny_roberta, out, metrics, val, test)


def test_resume_a_regression_run(tiny_roberta, cache, tmp_path, capsys):
    """Stopped mid-epoch 2 and resumed, a regression run ends with the uninterrupted run's weights and metrics."""
    data = write_table(tmp_path / "sts.csv", score_rows(120, seed=3))
    flags = ("--task", "regression", "--label-column", "score", "--save-every", "3")
    full = run_train(capsys, tiny_roberta, cache, data, tmp_path / "a", *flags)
    per_epoch = full["epochs"][0]["step"]
    b = tmp_path / "b"
    rc = train.main(argv(tiny_roberta, cache, data, b, *flags, "--stop-after-steps", str(per_epoch + 2)))
    assert rc == 0 and not (b / "metrics.json").exists(), capsys.readouterr().err
    assert rc == train.main(["--output", str(b), "--resume", "--threads", "1"]), capsys.readouterr().err
    resumed = json.loads((b / "metrics.json").read_text())
    check_run(resumed, b, "regression", ["score"])
    assert resumed["resumed_from_step"] == per_epoch + 2 and resumed["task"] == "regression"
    for key in ("test_pearson", "test_spearman", "test_mse", "test_loss", "val_pearson", "best_epoch", "steps"):
        assert resumed[key] == full[key], key
    wa, wb = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------- bad data

def _bad_data(tmp: Path, case: str) -> tuple[Path, list[str], str]:
    """(data file, flags, what the one error line must say) for each mistake a user makes in a task's file."""
    pairs = pair_rows(6)
    if case == "mixed label types":  # class ids, then a name on line 5
        rows = [{"text": r["sentence1"], "label": str(i % 2)} for i, r in enumerate(pairs)]
        rows[3]["label"] = "same"
        return write_table(tmp / "mixed.csv", rows), [], "mixed.csv line 5: label 'same' is neither an integer"
    if case == "multilabel string among lists":
        rows = genre_rows(6)
        rows[2]["label"] = "action"
        return (write_jsonl(tmp / "g.jsonl", rows), ["--task", "multilabel"],
                "g.jsonl line 3: label 'action' is not a list")
    if case == "regression label n/a":
        rows = score_rows(6)
        rows[4]["score"] = "n/a"
        return (write_table(tmp / "sts.csv", rows), ["--task", "regression", "--label-column", "score"],
                "sts.csv line 6: label 'n/a' is not a number")
    if case == "empty label list":
        rows = genre_rows(6)
        rows[1]["label"] = []
        return write_jsonl(tmp / "g.jsonl", rows), ["--task", "multilabel"], "g.jsonl line 2: empty label list"
    if case == "pair file without its second column":
        rows = [{"sentence1": r["sentence1"], "label": r["label"]} for r in pairs]
        return (write_table(tmp / "rte.tsv", rows, "\t"), ["--text-columns", "sentence1,sentence2"],
                "rte.tsv: no 'sentence2' column (columns: sentence1, label)")
    if case == "pair row without its second text":
        path = write_table(tmp / "rte.tsv", pairs, "\t")
        lines = path.read_text().splitlines()
        lines[3] = lines[3].split("\t")[0] + "\tsame"
        path.write_text("\n".join(lines) + "\n")
        return path, ["--text-columns", "sentence1,sentence2"], "rte.tsv line 4: no 'label' value (the row has 2 fields"
    if case == "jsonl pair without text_pair":
        rows = [{"text": r["sentence1"], "text_pair": r["sentence2"], "label": r["label"]} for r in pairs]
        del rows[4]["text_pair"]
        return write_jsonl(tmp / "p.jsonl", rows), [], "p.jsonl line 5: no 'text_pair' field"
    assert case == "unknown text column"
    return (write_table(tmp / "rte.tsv", pairs, "\t"), ["--text-columns", "premise,sentence2"],
            "rte.tsv: no 'premise' column (columns: sentence1, sentence2, label)")


BAD_DATA = ["mixed label types", "multilabel string among lists", "regression label n/a", "empty label list",
            "pair file without its second column", "pair row without its second text", "jsonl pair without text_pair",
            "unknown text column"]


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_task_data_is_one_line_exit_2_nothing_written(case, tiny_roberta, tmp_path, capsys):
    data, flags, message = _bad_data(tmp_path, case)
    out = tmp_path / "out"
    rc = train.main(["--data", str(data), "--output", str(out), "--model", str(tiny_roberta), "--cache-dir",
                     str(tmp_path / "cache"), "--threads", "1", *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith(f"error: {data}"), err
    assert message in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- learning (MiniLM)

from test_learning import minilm  # noqa: E402,F401  (the fixture: real MiniLM-L6 as RoBERTa; skips without ../shared)

# Training words and unseen test words: held-out accuracy needs what the pretrained base knows about them.
POSITIVE = ["good", "great", "wonderful", "excellent", "brilliant", "superb", "delightful", "fantastic", "lovely",
            "enjoyable", "beautiful", "marvelous", "charming", "terrific"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "dreadful", "boring", "dull", "poor", "painful", "lousy",
            "tedious", "mediocre", "disappointing", "weak"]
SEEN, UNSEEN = (POSITIVE[:10], NEGATIVE[:10]), (POSITIVE[10:], NEGATIVE[10:])
SUBJECTS = ["movie", "film", "acting", "plot", "story", "script", "music", "ending", "cast", "soundtrack"]
PREMISES = ["the {s} was {w}.", "i thought the {s} was {w}.", "honestly, the {s} is {w}.", "what a {w} {s}."]
HYPOTHESES = ["the {s} was {w}.", "the {s} is {w}.", "it was a {w} {s}."]


def nli_rows(n: int, seed: int, words: tuple[list[str], list[str]]) -> list[dict]:
    """NLI-like pairs: a premise of either polarity, then a hypothesis about the same subject with a word of the
    same polarity (entailment) or the opposite one (contradiction). Each text alone says nothing about the
    label (an XOR of the two polarities): only a model that reads both can beat chance."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        subject, positive, entails = rng.choice(SUBJECTS), rng.random() < 0.5, i % 2 == 0
        w1 = rng.choice(words[0] if positive else words[1])
        w2 = rng.choice(words[0] if positive == entails else words[1])
        rows.append({"text": rng.choice(PREMISES).format(s=subject, w=w1),
                     "text_pair": rng.choice(HYPOTHESES).format(s=subject, w=w2),
                     "label": "entailment" if entails else "contradiction"})
    return rows


def intensity_rows(n: int, seed: int, words: tuple[list[str], list[str]]) -> list[dict]:
    """Sentiment intensity: three aspects, each praised or panned; the score is 5 x the praised share (0-5)."""
    aspects = ["acting", "plot", "music", "script", "ending", "cast", "camera work", "dialogue"]
    rng, rows = random.Random(seed), []
    for _ in range(n):
        k = rng.randint(0, 3)
        praised = rng.sample([True] * k + [False] * (3 - k), 3)
        parts = [f"the {a} was {rng.choice(words[0] if p else words[1])}"
                 for a, p in zip(rng.sample(aspects, 3), praised)]
        rows.append({"text": f"{parts[0]}, {parts[1]} and {parts[2]}.", "score": f"{5 * k / 3:.2f}"})
    return rows


def test_nli_pairs_learned_on_real_minilm(minilm, cache, tmp_path, capsys):
    """A pair task MiniLM + LoRA really learns through train.py: 72 steps, unseen adjectives at test time."""
    train_rows = nli_rows(1200, 0, SEEN)
    for text in ("text", "text_pair"):  # the data are what the docstring says: one text alone is chance
        polarity = [bool(set(r[text].rstrip(".").split()) & set(SEEN[0])) for r in train_rows]
        agree = np.mean([p == (r["label"] == "entailment") for p, r in zip(polarity, train_rows)])
        assert 0.45 < agree < 0.55, (text, agree)
    data, test = write_jsonl(tmp_path / "nli.jsonl", train_rows), write_jsonl(tmp_path / "t.jsonl",
                                                                              nli_rows(300, 1, UNSEEN))
    out = tmp_path / "out"
    metrics = run_train(capsys, minilm, cache, data, out, "--test-data", str(test), "--adapter", "lora", "--lr",
                        "2e-3", "--batch-size", "16", epochs=1)
    print(f"MiniLM + LoRA, NLI-like pairs: held-out accuracy {metrics['test_accuracy']:.3f} "
          f"(val {metrics['val_accuracy']}, {metrics['steps']} steps)")
    assert metrics["labels"] == ["contradiction", "entailment"]
    assert metrics["test_accuracy"] >= 0.8, metrics


def test_sentiment_intensity_regression_on_real_minilm(minilm, cache, tmp_path, capsys):
    """A regression MiniLM + Houlsby adapters really learns (CSV, --label-column score): Pearson on unseen words."""
    data = write_table(tmp_path / "train.csv", intensity_rows(1200, 0, SEEN))
    test_rows = intensity_rows(300, 1, UNSEEN)
    test = write_table(tmp_path / "test.csv", test_rows)
    out = tmp_path / "out"
    metrics = run_train(capsys, minilm, cache, data, out, "--test-data", str(test), "--task", "regression",
                        "--label-column", "score", "--lr", "2e-3", "--batch-size", "16", epochs=1)
    r2 = 1 - metrics["test_mse"] / np.var([float(r["score"]) for r in test_rows])  # 0: predicting the mean
    print(f"MiniLM + Houlsby, sentiment intensity: held-out Pearson {metrics['test_pearson']:.3f}, Spearman "
          f"{metrics['test_spearman']:.3f}, MSE {metrics['test_mse']:.3f}, R² {r2:.3f} ({metrics['steps']} steps)")
    assert metrics["test_pearson"] >= 0.8 and metrics["test_spearman"] >= 0.8, metrics
    assert r2 >= 0.4, metrics
