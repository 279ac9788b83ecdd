"""roberta_lite.data for sentence pairs, regression and multi-label data: reading, errors, datasets, the token
cache and batching of pairs. Everything is built in tmp_path; one test uses ../shared/roberta-base (skips without).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from roberta_lite import data
from roberta_lite.data import (
    DataError,
    TextDataset,
    TokenizedSplit,
    length_batches,
    load_data,
    tokenize_cached,
    tokenize_dataset,
    train_val_split,
)

ROBERTA = Path(__file__).resolve().parents[1].parent / "shared" / "roberta-base"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, rows: list[object]) -> str:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def error(spec: str, test_spec: str | None = None, **kwargs) -> str:
    """The one-line message of the DataError that load_data raises."""
    with pytest.raises(DataError) as info:
        load_data(spec, test_spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# Sentence pairs


def test_default_pair_columns_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "p.csv", 'text,label,text_pair\n"A, first",yes,B one\nA two,no,"B, two"\n')
    train, test = load_data(csv_path, csv_path)
    assert train.texts == ["A, first", "A two"] and train.text_pairs == ["B one", "B, two"]
    assert train.labels == [1, 0] and train.label_names == ["no", "yes"] and test.text_pairs == train.text_pairs
    rows = [{"text": "a", "text_pair": "b", "label": 0}, {"text": "c", "text_pair": "d", "label": 1}]
    train, _ = load_data(jsonl(tmp_path / "p.jsonl", rows), str(tmp_path / "p.jsonl"))
    assert (train.texts, train.text_pairs) == (["a", "c"], ["b", "d"])
    single = write(tmp_path / "s.csv", "text,label\na,0\nb,1\n")
    assert load_data(single, single)[0].text_pairs is None  # no text_pair column: single texts


GLUE_MNLI = (
    "index\tpromptID\tsentence1\tsentence2\tgold_label\n"
    '0\t31193\t"Conceptually cream skimming has two basic dimensions\tProduct and geography are what make it work.'
    "\tneutral\n"
    '1\t101457\tyou know during the season i guess\tYou lose the things to the "following level if people recall.'
    "\tentailment\n"
    "2\t134793\tOne of our number will carry out your instructions minutely.\tA member of my team will execute "
    "your orders with immense precision.\tentailment\n"
    "3\t37397\tHow do you know? All this is their information again.\tThis information belongs to them.\tcontradiction\n"
)


def test_glue_tsv_with_named_columns_is_read_literally(tmp_path: Path) -> None:
    """GLUE's TSVs are not quoted: a text that starts with '"' must not swallow the tabs and lines after it."""
    path = write(tmp_path / "mnli.tsv", GLUE_MNLI)
    train, _ = load_data(path, path, text_columns=("sentence1", "sentence2"), label_column="gold_label")
    assert len(train) == 4
    assert train.texts[0] == '"Conceptually cream skimming has two basic dimensions'
    assert train.text_pairs[1] == 'You lose the things to the "following level if people recall.'
    assert train.label_names == ["contradiction", "entailment", "neutral"] and train.labels == [2, 1, 1, 0]


def test_mrpc_columns_with_bom_and_spaces_and_case_folding(tmp_path: Path) -> None:
    path = tmp_path / "mrpc.tsv"
    path.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said.\tHe told.\n"
                     "0\t3\t4\tIt rained.\tThe sun shone.\n".encode())
    train, _ = load_data(str(path), str(path), text_columns=("#1 String", "#2 STRING"), label_column="quality")
    assert (train.texts, train.text_pairs, train.labels) == (["He said.", "It rained."], ["He told.", "The sun shone."],
                                                             [1, 0])


def test_one_named_text_column(tmp_path: Path) -> None:
    path = write(tmp_path / "sst.tsv", "sentence\tlabel\thint\ngood film\t1\tx\nbad film\t0\ty\n")
    train, _ = load_data(path, path, text_columns=("sentence",))
    assert train.texts == ["good film", "bad film"] and train.text_pairs is None
    assert load_data(path, path, text_columns="sentence")[0].texts == train.texts  # one name as a string


def test_jsonl_with_named_pair_fields(tmp_path: Path) -> None:
    rows = [{"premise": "p1", "hypothesis": "h1", "gold": "yes"}, {"hypothesis": "h2", "gold": "no", "premise": "p2"}]
    path = jsonl(tmp_path / "nli.jsonl", rows)
    train, _ = load_data(path, path, text_columns=["premise", "hypothesis"], label_column="gold")
    assert (train.texts, train.text_pairs, train.labels) == (["p1", "p2"], ["h1", "h2"], [1, 0])


PAIR_ERRORS = {
    "named column missing": (
        "d.csv", "premise,gold\na,0\n", {"text_columns": ("premise", "hypothesis"), "label_column": "gold"},
        "{path}: no 'hypothesis' column (columns: premise, gold)",
    ),
    "named label column missing": (
        "d.tsv", "premise\thypothesis\tlabel\na\tb\t0\n", {"text_columns": ("premise", "hypothesis"),
                                                          "label_column": "gold"},
        "{path}: no 'gold' column (columns: premise, hypothesis, label)",
    ),
    "row without its second text": (
        "d.csv", "text,text_pair,label\na,b,0\nc\n", {},
        "{path} line 3: no 'text_pair' value (the row has 1 fields, the header 3)",
    ),
    "empty second text": (
        "d.csv", "text,text_pair,label\na,b,0\nc, ,1\n", {}, "{path} line 3: empty text in 'text_pair'",
    ),
    "jsonl line without its second text": (
        "d.jsonl", '{"text": "a", "text_pair": "b", "label": 0}\n{"text": "c", "label": 1}\n', {},
        "{path} line 2: no 'text_pair' field (keys: text, label)",
    ),
    "jsonl pair after single texts": (
        "d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "c", "text_pair": "d", "label": 1}\n', {},
        "{path} line 3: a 'text_pair' field, but {path} line 1 has none; "
        "either every example is a pair of texts or none is",
    ),
    "second text not a string": (
        "d.jsonl", '{"q": "a", "s": 7, "label": 0}\n', {"text_columns": ("q", "s")},
        "{path} line 1: 's' value 7 is not a string",
    ),
    "not an object": (
        "d.jsonl", '"just text"\n', {"text_columns": ("q", "s"), "label_column": "y"},
        "{path} line 1: expected a JSON object with 'q', 's' and 'y', got 'just text'",
    ),
    "three text columns": (
        "d.csv", "a,b,c,label\n", {"text_columns": ("a", "b", "c")},
        "text columns [\"a\", \"b\", \"c\"]: give one column name, or two for sentence pairs",
    ),
    "text column is the label column": (
        "d.csv", "a,label\n", {"text_columns": ("a", "label")},
        "text columns a, label and label column label: each must be a different column",
    ),
    "empty column name": ("d.csv", "a,label\n", {"text_columns": ("",)}, "text columns [\"\"]: give one column "
                          "name, or two for sentence pairs"),
    "unknown task": ("d.csv", "text,label\n", {"task": "ranking"},
                     "task 'ranking' is not one of classification, regression, multilabel, token-classification"),
}


@pytest.mark.parametrize("case", PAIR_ERRORS, ids=list(PAIR_ERRORS))
def test_pair_and_column_errors(tmp_path: Path, case: str) -> None:
    name, contents, kwargs, expected = PAIR_ERRORS[case]
    path = write(tmp_path / name, contents)
    assert error(path, **kwargs) == expected.format(path=path)


def test_test_file_must_have_the_training_columns(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", "text,text_pair,label\na,b,0\nc,d,1\n")
    test = write(tmp_path / "test.csv", "text,label\ne,0\n")
    assert error(train, test) == f"{test}: no 'text_pair' column (columns: text, label)"
    # the reverse: a single-text model reads only the text of a test file that has pairs
    _, got = load_data(write(tmp_path / "s.csv", "text,label\na,0\nb,1\n"), train)
    assert got.text_pairs is None and got.texts == ["a", "c"]


def test_imdb_sources_reject_columns_and_tasks(tmp_path: Path) -> None:
    tree = tmp_path / "aclImdb" / "train" / "pos"
    tree.mkdir(parents=True)
    (tree / "1_9.txt").write_text("good", encoding="utf-8")
    for kwargs in ({"text_columns": ("a", "b")}, {"label_column": "y"}, {"task": "regression"}):
        assert "aclImdb reviews are single texts with pos/neg classes" in error(str(tmp_path), **kwargs)


def test_pairs_survive_subset_and_split(tmp_path: Path) -> None:
    rows = [{"text": f"a{i}", "text_pair": f"b{i}" + ("\ufffd" if i == 3 else ""), "label": i % 2} for i in range(40)]
    train, test = load_data(jsonl(tmp_path / "d.jsonl", rows), test_fraction=0.25, seed=3)
    assert len(train) == 30 and len(test) == 10
    for ds in (train, test, *train_val_split(train, 0.2, seed=1)):
        assert all(p == "b" + t[1:] or p == "b" + t[1:] + "\ufffd" for t, p in zip(ds.texts, ds.text_pairs))
        assert all(label == int(t[1:]) % 2 for t, label in zip(ds.texts, ds.labels))
    whole = TextDataset([r["text"] for r in rows], [0] * 40, ["x"], "mem", 1, [r["text_pair"] for r in rows])
    assert whole.subset([3, 4]).replaced == 1 and whole.subset([4]).replaced == 0  # U+FFFD in a second text counts


def test_bad_bytes_in_a_second_text_are_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,text_pair,label\nfine,caf\xe9,0\nok,also ok,1\n")
    train, _ = load_data(str(path), str(path))
    assert train.text_pairs == ["caf\ufffd", "also ok"] and train.replaced == 1


# --------------------------------------------------------------------------------------------------
# Regression


STSB = (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\tA man plays a flute.\t3.800\n"
    "2\tmain-captions\tMSRvid\t2012test\t0005\tnone\tnone\tA man spreads cheese.\tA man is eating.\t0.5\n"
    "3\tmain-captions\tMSRvid\t2012test\t0006\tnone\tnone\tThree men play chess.\tTwo men play chess.\t2\n"
)


def test_stsb_regression(tmp_path: Path) -> None:
    path = write(tmp_path / "sts.tsv", STSB)
    train, test = load_data(path, path, text_columns=("sentence1", "sentence2"), label_column="score",
                            task="regression")
    assert train.task == test.task == "regression"
    assert train.labels == [5.0, 3.8, 0.5, 2.0] and train.label_names == ["score"] and train.num_outputs == 1
    labels = train.label_array()
    assert labels.dtype == np.float32 and labels.shape == (4,)
    assert np.allclose(labels, [5.0, 3.8, 0.5, 2.0])
    assert train.text_pairs[2] == "A man is eating."


def test_regression_jsonl_numbers_and_strings(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": -2.5}, {"text": "c", "label": " 1e-3 "},
            {"text": "d", "label": ".5"}]
    path = jsonl(tmp_path / "r.jsonl", rows)
    train, _ = load_data(path, path, task="regression")
    assert train.labels == [1.0, -2.5, 0.001, 0.5] and train.label_names == ["label"]
    one, _ = load_data(path, path, task="regression", label_column="label")
    assert one.labels == train.labels
    split_train, split_test = load_data(path, task="regression", test_fraction=0.5)  # a held-out split of scores
    assert sorted(split_train.labels + split_test.labels) == sorted(train.labels)


REGRESSION_ERRORS = {
    "a word": ("r.csv", "text,label\na,1.5\nb,high\n", "{path} line 3: label 'high' is not a number; "
               "regression labels are numbers such as 3.8"),
    "nan": ("r.csv", "text,label\na,nan\n", "{path} line 2: label 'nan' is not a number; "
            "regression labels are numbers such as 3.8"),
    "a comma decimal": ("r.tsv", "text\tlabel\na\t3,8\n", "{path} line 2: label '3,8' is not a number; "
                        "regression labels are numbers such as 3.8"),
    "empty": ("r.csv", "text,label\na,\n", "{path} line 2: label '' is not a number; "
              "regression labels are numbers such as 3.8"),
    "overflow": ("r.csv", "text,label\na,1e999\n", "{path} line 2: label '1e999' is not a finite number"),
    "json infinity": ("r.jsonl", '{"text": "a", "label": 1e400}\n', "{path} line 1: label Infinity is not a finite number"),
    "json huge integer": ("r.jsonl", '{"text": "a", "label": ' + "9" * 400 + "}\n",
                          "{path} line 1: label " + "9" * 60 + "... is not a finite number"),
    "json boolean": ("r.jsonl", '{"text": "a", "label": true}\n', "{path} line 1: label true is not a number; "
                     "regression labels are numbers such as 3.8"),
    "json list": ("r.jsonl", '{"text": "a", "label": [1.0]}\n', "{path} line 1: label [1.0] is not a number; "
                  "regression labels are numbers such as 3.8"),
}


@pytest.mark.parametrize("case", REGRESSION_ERRORS, ids=list(REGRESSION_ERRORS))
def test_regression_errors(tmp_path: Path, case: str) -> None:
    name, contents, expected = REGRESSION_ERRORS[case]
    path = write(tmp_path / name, contents)
    assert error(path, task="regression") == expected.format(path=path)


# --------------------------------------------------------------------------------------------------
# Multi-label


def test_multilabel_jsonl_and_csv_give_the_same_dataset(tmp_path: Path) -> None:
    rows = [("a", ["comedy", "action"]), ("b", ["drama"]), ("c", ["action", "drama", "comedy"])]
    path_j = jsonl(tmp_path / "m.jsonl", [{"text": t, "label": labels} for t, labels in rows])
    path_c = write(tmp_path / "m.csv", "text,label\n" + "".join(f"{t},{'|'.join(ls)}\n" for t, ls in rows))
    path_t = write(tmp_path / "m.tsv", "text\tlabel\n" + "".join(f"{t}\t {' | '.join(ls)} \n" for t, ls in rows))
    for path in (path_j, path_c, path_t):
        train, _ = load_data(path, path, task="multilabel")
        assert train.task == "multilabel" and train.label_names == ["action", "comedy", "drama"]
        assert train.labels == [(0, 1), (2,), (0, 1, 2)] and train.num_outputs == 3
        hot = train.label_array()
        assert hot.dtype == np.float32 and hot.shape == (3, 3)
        assert hot.tolist() == [[1, 1, 0], [0, 0, 1], [1, 1, 1]]


def test_multilabel_class_ids_and_unseen_test_labels(tmp_path: Path) -> None:
    train_path = jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": [0, 2]}, {"text": "b", "label": ["1"]}])
    train, _ = load_data(train_path, train_path, task="multilabel")
    assert train.label_names == ["0", "1", "2"] and train.labels == [(0, 2), (1,)]
    test_path = write(tmp_path / "test.csv", "text,label\nc,0|1\nd,2|3\n")
    assert error(train_path, test_path, task="multilabel") == (
        f"{test_path} line 3: label 3 does not occur in the training data {train_path} (labels: 0, 1, 2)"
    )


MULTILABEL_ERRORS = {
    "empty list": ("m.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": []}\n',
                   "{path} line 2: empty label list; a multilabel example needs at least one label"),
    "a name among lists": ("m.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": "x"}\n',
                           "{path} line 2: label 'x' is not a list; multilabel labels are lists such as "
                           "[\"action\", \"comedy\"]"),
    "empty cell": ("m.csv", "text,label\na,x|y\nb,  \n",
                   "{path} line 3: no labels; a multilabel example needs at least one (e.g. action|comedy)"),
    "empty label between separators": ("m.csv", "text,label\na,x||y\n", "{path} line 2: empty label"),
    "repeated label": ("m.csv", "text,label\na,x|y|x\n", "{path} line 2: label 'x' is listed twice"),
    "float in a list": ("m.jsonl", '{"text": "a", "label": ["x", 1.5]}\n',
                        "{path} line 1: label 1.5 is a float; labels must be integer class ids or label names"),
    "ids among names": (
        "m.jsonl", '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["y", 2]}\n',
        "{path} line 2: label 2 is an integer but the other labels in {path} are names "
        "(e.g. {path} line 1: 'x'); labels must be all integers or all names",
    ),
}


@pytest.mark.parametrize("case", MULTILABEL_ERRORS, ids=list(MULTILABEL_ERRORS))
def test_multilabel_errors(tmp_path: Path, case: str) -> None:
    name, contents, expected = MULTILABEL_ERRORS[case]
    path = write(tmp_path / name, contents)
    assert error(path, task="multilabel") == expected.format(path=path)


def test_a_list_label_in_a_classification_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n')
    assert error(path) == f"{path} line 2: label [\"x\", \"y\"] is a list; labels must be integer class ids or label names"


def test_dataset_validation_per_task() -> None:
    ds = TextDataset(["a", "b"], [(0, 2), (1,)], ["x", "y", "z"], "mem", task="multilabel")
    assert ds.subset([1]).labels == [(1,)] and ds.subset([1]).task == "multilabel"
    with pytest.raises(ValueError):
        TextDataset(["a"], [(0, 3)], ["x", "y", "z"], "mem", task="multilabel")
    with pytest.raises(ValueError):
        TextDataset(["a", "b"], [0, 1], ["x", "y"], "mem", text_pairs=["only one"])
    with pytest.raises(ValueError):
        TextDataset(["a"], [0], ["x", "y"], "mem", task="ranking")
    scores = TextDataset(["a", "b"], [7.5, -1.0], ["score"], "mem", task="regression")  # any float is a score
    assert scores.label_array().tolist() == [7.5, -1.0]
    classes = TextDataset(["a", "b"], [1, 0], ["x", "y"], "mem")
    assert classes.label_array().dtype == np.int64 and classes.num_outputs == 2


# --------------------------------------------------------------------------------------------------
# Token cache and batching of pairs


class PairTokenizer:
    """Word-hash ids; ``<s> A </s></s> B </s>`` for pairs, each text cut to half of what is left (a stand-in)."""

    def __init__(self, fingerprint: str = "pair-fake-v1") -> None:
        self.fingerprint = fingerprint
        self.calls = 0

    @staticmethod
    def words(text: str) -> list[int]:
        return [3 + int.from_bytes(hashlib.md5(w.encode()).digest()[:2], "little") for w in text.split()]

    def encode_batch(self, texts: list[str], max_length: int, *, text_pairs: list[str] | None = None) -> list[list[int]]:
        self.calls += 1
        if text_pairs is None:
            return [[0] + self.words(t)[: max_length - 2] + [2] for t in texts]
        half = (max_length - 4) // 2
        return [[0] + self.words(a)[:half] + [2, 2] + self.words(b)[:half] + [2] for a, b in zip(texts, text_pairs)]


FIRSTS = ["the cat sat", "a dog", "one two three four five", "x"]
SECONDS = ["on the mat", "barked loudly at night", "six", "y z"]


def test_tokenize_cached_pairs_and_their_cache_key(tmp_path: Path) -> None:
    tok = PairTokenizer()
    pairs = tokenize_cached(FIRSTS, tok, 64, cache=tmp_path, text_pairs=SECONDS)
    assert [p.tolist() for p in pairs] == tok.encode_batch(FIRSTS, 64, text_pairs=SECONDS)
    assert [len(p) for p in pairs] == [len(a.split()) + len(b.split()) + 4 for a, b in zip(FIRSTS, SECONDS)]
    singles = tokenize_cached(FIRSTS, tok, 64, cache=tmp_path)  # same first texts, no pairs: another key
    assert [s.tolist() for s in singles] == tok.encode_batch(FIRSTS, 64)
    tokenize_cached(FIRSTS, tok, 64, cache=tmp_path, text_pairs=SECONDS[::-1])  # other second texts
    tokenize_cached(FIRSTS, tok, 12, cache=tmp_path, text_pairs=SECONDS)  # other max_length
    joined = [a + " " + b for a, b in zip(FIRSTS, SECONDS)]
    tokenize_cached(joined, tok, 64, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 5
    calls = tok.calls
    again = tokenize_cached(FIRSTS, tok, 64, cache=tmp_path, text_pairs=list(SECONDS))  # a hit
    assert tok.calls == calls and all(np.array_equal(a, b) for a, b in zip(pairs, again))
    with pytest.raises(ValueError):
        tokenize_cached(FIRSTS, tok, 64, cache=tmp_path, text_pairs=SECONDS[:2])


def test_single_text_cache_key_is_unchanged() -> None:
    """Caches written before pairs existed stay valid: the key of single texts is what it was."""
    assert data._token_cache_key(["a", "bc"], "fp", 8) == _old_key(["a", "bc"], "fp", 8)
    assert data._token_cache_key(["a", "bc"], "fp", 8, ["", ""]) != _old_key(["a", "bc"], "fp", 8)


def _old_key(texts: list[str], fingerprint: str, max_length: int) -> str:
    """The key as the single-text cache computed it before pairs were added."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    key = hashlib.sha256(b"roberta_lite.tokens.v1")
    for part in (fingerprint.encode(), str(max_length).encode(), digest.digest()):
        key.update(len(part).to_bytes(8, "little") + part)
    return key.hexdigest()


def test_pairs_stay_aligned_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_ENCODE_CHUNK", 3)
    firsts = [f"first {i}" for i in range(10)]
    seconds = ["w " * i + f"second {i}" for i in range(10)]
    tok = PairTokenizer()
    got = tokenize_cached(firsts, tok, 64, cache=tmp_path, text_pairs=seconds)
    assert tok.calls == 4 and [g.tolist() for g in got] == PairTokenizer().encode_batch(firsts, 64, text_pairs=seconds)


def test_tokenize_dataset_per_task(tmp_path: Path) -> None:
    tok = PairTokenizer()
    pairs = TextDataset(FIRSTS, [0.5, 1.0, 4.0, 2.5], ["score"], "mem", text_pairs=SECONDS, task="regression")
    split = tokenize_dataset(pairs, tok, 64, cache=tmp_path)
    assert isinstance(split, TokenizedSplit) and len(split) == 4 and split.task == "regression"
    assert split.labels.dtype == np.float32 and split.labels.tolist() == [0.5, 1.0, 4.0, 2.5]
    assert split.lengths.tolist() == [10, 10, 10, 7] and split.label_names == ["score"]
    multi = TextDataset(FIRSTS, [(0,), (1,), (0, 1), (1,)], ["a", "b"], "mem", task="multilabel")
    split = tokenize_dataset(multi, tok, 64, cache=tmp_path)
    assert split.labels.shape == (4, 2) and split.lengths.tolist() == [5, 4, 7, 3]  # single texts
    classes = tokenize_dataset(TextDataset(FIRSTS, [0, 1, 1, 0], ["n", "p"], "mem"), tok, 64, cache=tmp_path)
    assert classes.labels.dtype == np.int64 and classes.labels.tolist() == [0, 1, 1, 0]


def test_length_batches_count_both_texts(tmp_path: Path) -> None:
    """Same first texts, very different second texts: buckets (and the token budget) follow the joined length."""
    firsts = ["same first text"] * 8
    seconds = ["w " * n for n in (40, 1, 39, 2, 38, 3, 37, 4)]
    split = tokenize_dataset(TextDataset(firsts, [0] * 8, ["x"], "mem", text_pairs=seconds), PairTokenizer(), 128,
                             cache=tmp_path)
    batches = length_batches(split.lengths, max_tokens=100, shuffle=False)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3, 5, 7], [4, 6]]
    for batch in batches:
        assert max(split.lengths[i] for i in batch) * len(batch) <= 100


@pytest.mark.skipif(not (ROBERTA / "tokenizer.json").is_file(), reason="../shared/roberta-base is absent")
def test_pairs_through_the_real_tokenizer(tmp_path: Path) -> None:
    from roberta_lite import Tokenizer

    tok = Tokenizer.from_pretrained(ROBERTA)
    path = write(tmp_path / "sts.tsv", STSB)
    train, _ = load_data(path, path, text_columns=("sentence1", "sentence2"), label_column="score", task="regression")
    split = tokenize_dataset(train, tok, 12, cache=tmp_path)
    for seq, a, b in zip(split.seqs, train.texts, train.text_pairs):
        assert seq.tolist() == tok.encode(a, b, max_length=12)
        assert seq.dtype == np.int32 and len(seq) <= 12 and (seq == 2).sum() == 3
