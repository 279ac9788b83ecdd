"""train.py end to end on tiny generated data, resume/interrupt/crash safety, DDP on gloo, bad input, predict,
and a learning test on a real pretrained checkpoint (MiniLM as RoBERTa, from ../shared; skipped without it)."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_WORDS

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the top-level script)
from roberta_lite import data as D  # noqa: E402
from roberta_lite import Model, Tokenizer  # noqa: E402
from roberta_lite import checkpoint as CK  # noqa: E402
from roberta_lite.adapters import adapter_tensors  # noqa: E402
from roberta_lite import predict, runtime  # noqa: E402

POSITIVE, NEGATIVE, FILLER = TINY_WORDS[:10], TINY_WORDS[10:20], TINY_WORDS[20:]
METRIC_KEYS = {"test_accuracy", "test_loss", "val_accuracy", "train_tokens_per_second", "wall_seconds", "steps",
               "resumed_from_step", "config", "padding_fraction", "device", "dtype", "epochs", "best_epoch"}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def examples(n: int, seed: int, pos=POSITIVE, neg=NEGATIVE, filler=FILLER) -> list[tuple[str, int]]:
    """Balanced sentences: some filler words plus two words of the label's sentiment."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(3, 12))] + [rng.choice(pos if y else neg)
                                                                           for _ in range(2)]
        rng.shuffle(words)
        out.append((" ".join(words), y))
    return out


def write_aclimdb(root: Path, n_train=120, n_test=40, bad_bytes=True) -> Path:
    """An aclImdb tree ({train,test}/{pos,neg}/ID_RATING.txt); one review with a non-UTF-8 byte and a <br />."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        for i, (text, y) in enumerate(examples(n, seed)):
            d = root / "aclImdb" / split / ("pos" if y else "neg")
            d.mkdir(parents=True, exist_ok=True)
            raw = text.encode()
            if bad_bytes and split == "train" and i == 0:
                raw = raw + b" caf\xe9<br />the end"
            (d / f"{i}_{8 if y else 2}.txt").write_bytes(raw)
    return root / "aclImdb"


def write_csv(path: Path, rows: list[tuple[str, object]], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def common(model: Path, cache: Path, *more: str) -> list[str]:
    return ["--model", str(model), "--cache-dir", str(cache), "--epochs", "2", "--batch-size", "8",
            "--threads", "1", *more]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = train.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def check_outputs(out_dir: Path, epochs: int = 2) -> dict:
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert len(metrics["val_accuracy"]) == epochs and metrics["train_tokens_per_second"] > 0
    assert metrics["config"]["lr"] == 1e-4 and metrics["config"]["epochs"] == epochs
    assert (out_dir / "adapter.safetensors").is_file() and (out_dir / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, metrics["steps"] + 1))
    assert all({"loss", "lr"} <= set(r) for r in rows)
    assert not (out_dir / "checkpoint").exists()  # a finished run leaves nothing to resume
    return metrics


# ---------------------------------------------------------------------------------------------- end to end

def test_cli_aclimdb_directory_then_predict(tiny_roberta, cache, tmp_path):
    """The real command line, as a user runs it: train on an aclImdb tree, then predict with the adapter."""
    data = write_aclimdb(tmp_path / "data")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(data), "--output", str(out),
                        *common(tiny_roberta, cache)], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "1 text(s) contained bytes that are not valid UTF-8" in r.stdout
    metrics = check_outputs(out)
    assert metrics["labels"] == ["neg", "pos"] and metrics["replaced_non_utf8"] == 1
    assert metrics["examples"]["test"] == 40 and metrics["resumed_from_step"] is None
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["labels"] == ["neg", "pos"] and meta["base_model"] == str(tiny_roberta.resolve())

    r = subprocess.run([sys.executable, "-m", "roberta_lite.predict", "--adapter", str(out), "a great film",
                        "dull and boring"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["text"] for x in lines] == ["a great film", "dull and boring"]
    for x in lines:  # the label is the most probable class, and the probabilities are a distribution
        assert x["probability"] == max(x["probabilities"].values()) == x["probabilities"][x["label"]]
        assert abs(sum(x["probabilities"].values()) - 1) < 1e-5


@pytest.mark.parametrize("fmt", ["archive", "csv", "jsonl"])
def test_formats_end_to_end(fmt, tiny_roberta, cache, tmp_path, capsys):
    if fmt == "archive":
        tree = write_aclimdb(tmp_path / "tree", bad_bytes=False)
        data = tmp_path / "aclImdb_v1.tar.gz"
        with tarfile.open(data, "w:gz") as tar:
            tar.add(tree, arcname="aclImdb")
        extra, labels, n_test = [], ["neg", "pos"], 40
    elif fmt == "csv":  # integer labels, separate test file
        data = write_csv(tmp_path / "train.csv", examples(100, 0))
        test = write_csv(tmp_path / "test.csv", examples(30, 1))
        extra, labels, n_test = ["--test-data", str(test)], ["0", "1"], 30
    else:  # label names, seeded held-out test part
        data = write_jsonl(tmp_path / "d.jsonl", [(t, "pos" if y else "neg") for t, y in examples(100, 0)])
        extra, labels, n_test = [], ["neg", "pos"], 20
    out = tmp_path / ("float" if fmt == "csv" else "out")  # "float": a ModuleDict attribute, renamed float_adapter
    rc, stdout, err = run_main(["--data", str(data), "--output", str(out), *common(tiny_roberta, cache), *extra],
                               capsys)
    assert rc == 0, err[-3000:]
    metrics = check_outputs(out)
    assert metrics["labels"] == labels and metrics["examples"]["test"] == n_test
    assert json.loads((out / "adapter_config.json").read_text())["labels"] == labels
    assert "test accuracy" in stdout

    # predict reads the adapter: arguments, a text file and a JSONL file
    (tmp_path / "t.txt").write_text("a great film\n\nterrible plot\n")
    (tmp_path / "t.jsonl").write_text('{"text": "wonderful"}\n{"text": "awful", "id": 3}\n')
    for argv, n in ((["superb"], 1), (["--file", str(tmp_path / "t.txt")], 2),
                    (["--file", str(tmp_path / "t.jsonl")], 2)):
        assert predict.main(["--adapter", str(out), "--device", "cpu", *argv]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(rows) == n and all(r["label"] in labels and set(r["probabilities"]) == set(labels) for r in rows)


def test_predict_errors(tmp_path, capsys):
    assert predict.main(["--adapter", str(tmp_path / "nope"), "text"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert predict.main(["--adapter", str(tmp_path)]) == 2  # no texts
    assert "no texts" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    assert predict.main(["--adapter", str(tmp_path), "--file", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl line 2: invalid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- resume

def test_resume_matches_uninterrupted_run(tiny_roberta, cache, tmp_path, capsys):
    """Two interruptions (mid-epoch 1, mid-epoch 2) and two resumes end with bit-identical weights and metrics."""
    data = write_jsonl(tmp_path / "d.jsonl", [(t, "pos" if y else "neg") for t, y in examples(120, 0)])
    base = ["--data", str(data), *common(tiny_roberta, cache), "--save-every", "3"]
    rc, _, err = run_main([*base, "--output", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    full = check_outputs(tmp_path / "a")
    per_epoch = full["epochs"][0]["step"]

    b = tmp_path / "b"
    rc, out, err = run_main([*base, "--output", str(b), "--stop-after-steps", "5"], capsys)
    assert rc == 0 and "checkpoint written" in out and not (b / "metrics.json").exists()
    # a fresh run must not silently overwrite an unfinished one; a resume must not change the recipe
    rc, _, err = run_main([*base, "--output", str(b)], capsys)
    assert rc == 1 and "--resume" in err
    rc, _, err = run_main([*base, "--output", str(b), "--resume", "--lr", "0.5"], capsys)
    assert rc == 2 and "--lr" in err
    rc, _, err = run_main(["--output", str(b), "--resume", "--stop-after-steps", str(per_epoch + 4), "--threads", "1"],
                          capsys)
    assert rc == 0, err
    assert json.loads((b / "checkpoint" / "state.json").read_text())["step"] == per_epoch + 4
    rc, _, err = run_main(["--output", str(b), "--resume", "--threads", "1"], capsys)
    assert rc == 0, err

    resumed = check_outputs(b)
    assert resumed["resumed_from_step"] == per_epoch + 4 and resumed["steps"] == full["steps"]
    wa, wb = load_file(tmp_path / "a" / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("test_accuracy", "test_loss", "val_accuracy", "best_epoch"):
        assert resumed[key] == full[key], key
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "a") == losses(b)


def _save_forever(output: str):
    """Child process: write checkpoints in a loop (with growing steps) until killed."""
    step = 0
    while True:
        step += 1
        t = {"w": torch.full((256, 256), float(step))}
        CK.save_checkpoint(Path(output), {"trainable": t, "optimizer": t, "best": t}, {"step": step})


def test_kill_9_never_leaves_an_unloadable_checkpoint(tmp_path):
    """SIGKILL a process that is writing checkpoints, at random moments: a complete one is always found."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for _ in range(8):
        p = ctx.Process(target=_save_forever, args=(str(tmp_path),))
        p.start()
        time.sleep(0.15 + rng.random() * 0.2)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        state, tensors, where = CK.load_checkpoint(tmp_path)
        assert torch.equal(tensors["trainable"]["w"], torch.full((256, 256), float(state["step"])))
    # the mid-swap state (only checkpoint.old-PID complete) and a torn file are both handled
    d = tmp_path / "mid-swap"
    t = {"w": torch.ones(3)}
    CK.save_checkpoint(d, {"trainable": t, "optimizer": t, "best": t}, {"step": 7})
    os.rename(d / "checkpoint", d / "checkpoint.old-1")
    (d / "checkpoint.tmp-2").mkdir()
    state, _, where = CK.load_checkpoint(d)
    assert where.name == "checkpoint.old-1"
    with open(where / "best.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(train.CheckpointError, match="no loadable checkpoint"):
        CK.load_checkpoint(d)


def _step_now(out: Path) -> int:
    """The step of the checkpoint now on disk (-1 while a concurrent writer swaps it under our feet)."""
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def test_sigterm_writes_a_checkpoint_and_resume_continues(tiny_roberta, cache, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [(t, "pos" if y else "neg") for t, y in examples(120, 0)])
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(data), "--output", str(out),
           *common(tiny_roberta, cache), "--epochs", "500"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    log = out / "log.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "checkpoint written" in stdout
    state, _, _ = CK.load_checkpoint(out)
    assert state["step"] >= 5

    # resume, then kill -9 mid-run: the checkpoint left behind still loads and is at least as far along
    p = subprocess.Popen([*cmd, "--resume", "--save-every", "1"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 90
    while time.time() < deadline and _step_now(out) < state["step"] + 10:
        time.sleep(0.05)
    p.kill()
    p.wait(timeout=30)
    assert CK.load_checkpoint(out)[0]["step"] >= state["step"] + 10


# ---------------------------------------------------------------------------------------------- DDP

def test_ddp_two_processes_on_gloo(tiny_roberta, cache, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [(t, "pos" if y else "neg") for t, y in examples(120, 0)])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "train.py"), "--data", str(data), "--output", str(out), "--device", "cpu",
                        *common(tiny_roberta, cache)], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("test accuracy") == 1  # rank 0 alone reports and writes
    metrics = check_outputs(out)
    assert metrics["world_size"] == 2
    # each rank takes every other length-bucketed batch: half the steps of one process
    single = D.length_batches([1] * metrics["examples"]["train"], batch_size=8, shuffle=True)
    assert metrics["steps"] == 2 * (len(single) // 2)
    # DDP averaged the gradients: both ranks trained on different batches yet ended with the same weights
    digests = metrics["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


# ---------------------------------------------------------------------------------------------- bad input

def _bad_cases(tmp: Path, model: Path) -> list[tuple[str, list[str], int, str]]:
    (tmp / "empty" / "aclImdb" / "train" / "pos").mkdir(parents=True)
    empty_tar = tmp / "empty.tar.gz"
    with tarfile.open(empty_tar, "w:gz") as tar:
        info = tarfile.TarInfo("aclImdb/README")
        tar.addfile(info, io.BytesIO(b""))
        info.size = 0
    rows = examples(20, 0)
    no_label = write_csv(tmp / "nolabel.csv", rows, header=("text", "sentiment"))
    no_text = write_csv(tmp / "notext.csv", rows, header=("review", "label"))
    bad_label = write_csv(tmp / "badlabel.csv", rows[:5] + [("fine film", "maybe")] + rows[5:])
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "x", label: 1}\n')
    ok = write_jsonl(tmp / "ok.jsonl", rows)
    m = ["--model", str(model)]
    return [
        ("missing data", ["--data", str(tmp / "nope.csv"), *m], 2, "data path not found"),
        ("empty aclImdb dir", ["--data", str(tmp / "empty"), *m], 2, "no labelled"),
        ("archive without reviews", ["--data", str(empty_tar), *m], 2, "no labelled"),
        ("csv without label", ["--data", str(no_label), *m], 2, "no 'label' column"),
        ("csv without text", ["--data", str(no_text), *m], 2, "no 'text' column"),
        ("unknown label", ["--data", str(bad_label), *m], 2, "badlabel.csv line 7: label 'maybe'"),
        ("malformed jsonl", ["--data", str(bad_json), *m], 2, "bad.jsonl line 3: invalid JSON"),
        ("missing model", ["--data", str(ok), "--model", str(tmp / "no-model")], 1, "not found"),
        ("negative epochs", ["--data", str(ok), *m, "--epochs", "-1"], 2, "--epochs"),
        ("batch size 0", ["--data", str(ok), *m, "--batch-size", "0"], 2, "--batch-size"),
        ("max length too long", ["--data", str(ok), *m, "--max-length", "600"], 2, "limit of 128"),
        ("lr not a number", ["--data", str(ok), *m, "--lr", "fast"], 2, "--lr"),
        ("unknown flag", ["--data", str(ok), *m, "--epoch", "3"], 2, "unrecognized"),
        ("no data", [*m], 2, "--data is required"),
        ("output is a file", ["--data", str(ok), *m, "--output", str(ok)], 2, "is a file"),
        ("resume without checkpoint", ["--data", str(ok), *m, "--output", str(tmp / "o"), "--resume"], 1,
         "no loadable checkpoint"),
    ]


def test_bad_input_gives_one_line_and_no_traceback(tiny_roberta, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, argv, code, message in _bad_cases(tmp_path, tiny_roberta):
        rc, _, err = run_main(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("tokenizing", "\r"))]
        assert rc == code, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, err)
    if not torch.cuda.is_available():
        rc, _, err = run_main(["--data", "x.csv", "--device", "cuda"], capsys)
        assert rc == 2 and "no CUDA GPU" in err


def test_imdb_offline_says_how_to_pass_a_local_copy(tiny_roberta, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise D.urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    rc, _, err = run_main(["--data", "imdb", "--model", str(tiny_roberta), "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "offline" in err and "--data" in err


def test_bad_input_through_the_real_cli(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(tmp_path / "missing"),
                        "--batch-size", "0"], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: argument")


# ---------------------------------------------------------------------------------------------- learning

@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    from checkpoints import build_minilm  # skips when ../shared or the MiniLM package is absent

    return build_minilm(tmp_path_factory.mktemp("minilm"))


def test_learns_an_easy_task_on_a_real_pretrained_model(minilm, cache, tmp_path, capsys):
    pos = "wonderful excellent brilliant superb delightful fantastic beautiful enjoyable marvelous great".split()
    neg = "terrible awful horrible dreadful boring dull poor disappointing painful bad".split()
    filler = "the a movie film story plot acting cast was is and it this very quite really rather".split()
    data = write_jsonl(tmp_path / "train.jsonl", [(t, "pos" if y else "neg")
                                                  for t, y in examples(800, 0, pos, neg, filler)])
    test = write_jsonl(tmp_path / "test.jsonl", [(t, "pos" if y else "neg")
                                                 for t, y in examples(200, 1, pos, neg, filler)])
    out = tmp_path / "out"
    rc, _, err = run_main(["--data", str(data), "--test-data", str(test), "--model", str(minilm), "--output",
                           str(out), "--cache-dir", str(cache), "--epochs", "1", "--batch-size", "16", "--lr",
                           "1e-3", "--threads", "1"], capsys)
    assert rc == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9, metrics
    assert metrics["dtype"] == ("bfloat16" if runtime.cpu_has_fast_bf16() else "float32")


def test_curves_png_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1 / i, "lr": 1e-4}) + "\n" for i in range(1, 20)))
    assert train.plot_curves(tmp_path, log, [{"epoch": 1, "val_accuracy": 0.6}, {"epoch": 2, "val_accuracy": 0.8}],
                             "accuracy")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_hub_ids_are_reused_from_weights_dir_offline(tiny_roberta, tmp_path):
    """A hub id already fetched into weights/<id>/ is used from there (no network); the adapter records the id."""
    import shutil

    shutil.copytree(tiny_roberta, tmp_path / "org" / "tiny")
    root, name = runtime.resolve_base("org/tiny", weights_dir=tmp_path)
    assert root == (tmp_path / "org" / "tiny").resolve() and name == "org/tiny"
    root, name = runtime.resolve_base(tiny_roberta)
    assert root == tiny_roberta.resolve() and name == str(tiny_roberta.resolve())
    with pytest.raises(FileNotFoundError, match="not found"):
        runtime.resolve_base(tmp_path / "missing")
    assert runtime.select_dtype("fp32", torch.device("cpu")) == torch.float32
    assert train.default_output("/x/aclImdb_v1.tar.gz", "pfeiffer") == Path("weights/adapters/aclImdb_v1-pfeiffer")


# ---------------------------------------------------------------------------------------------- what is trained on

def test_every_training_example_trains_once_per_epoch_and_no_other(tiny_roberta, cache, tmp_path, capsys):
    """Train, validation and test are disjoint; train + validation is the whole training file; each epoch
    trains on every training example exactly once, the last partial batch included."""
    rows = [(f"{t} n{i}", "pos" if y else "neg") for i, (t, y) in enumerate(examples(61, 3))]  # unique texts
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    test = write_jsonl(tmp_path / "t.jsonl", [(t, "pos" if y else "neg") for t, y in examples(10, 4)])
    out = tmp_path / "out"
    rc, _, err = run_main(["--data", str(data), "--test-data", str(test), "--output", str(out),
                           "--val-fraction", "0.2", *common(tiny_roberta, cache)], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    train_ds, test_ds = D.load_data(str(data), str(test), seed=0)
    tr, va = D.train_val_split(train_ds, 0.2, seed=0)
    assert metrics["examples"] == {"train": len(tr), "validation": len(va), "test": 10}
    assert len(tr) + len(va) == 61 and len(tr) % 8 != 0  # a partial last batch exists
    assert not set(tr.texts) & set(va.texts) and not (set(tr.texts) | set(va.texts)) & set(test_ds.texts)
    tok = Tokenizer.from_pretrained(tiny_roberta)
    tokens = D.tokenize_cached(tr.texts, tok, metrics["config"]["max_length"], cache=cache)
    assert metrics["train_tokens"] == 2 * sum(len(t) for t in tokens)  # 2 epochs over exactly this split


def test_evaluation_and_prediction_build_no_autograd_graph(tiny_roberta, tmp_path):
    """Evaluation once chained every batch's graph onto the next (out of memory on IMDB's test set): with the
    adapter trainable, no forward pass of an evaluation or a prediction may record autograd history."""
    model = Model.from_pretrained(tiny_roberta, adapter="houlsby")
    model.freeze_base()  # the adapter and head require grad, as during training
    recorded = []
    hook = lambda module, inputs, output: recorded.append(output.requires_grad or torch.is_grad_enabled())
    model.active_head.register_forward_hook(hook)
    seqs = [np.arange(3, 3 + n) for n in (5, 9, 7, 12, 4)]
    logits = train.predict_all(model, seqs, batch_size=2, pad_id=model.config.pad_id, device=torch.device("cpu"),
                               rank=0, world=1, desc="test")
    assert logits.shape == (5, 2) and len(recorded) == 3 and not any(recorded)
    model.save_adapter(tmp_path / "a")
    predictor = predict.Predictor(tmp_path / "a", model=str(tiny_roberta), device="cpu")
    predictor.model.active_head.register_forward_hook(hook)
    predictor(["a film", "another film"])
    assert len(recorded) > 3 and not any(recorded)


def test_restore_optimizer_puts_fused_step_counts_on_the_parameters_device():
    """CUDA's fused AdamW refuses CPU step tensors; plain AdamW keeps them on the CPU (as PyTorch creates them)."""
    p = torch.nn.Parameter(torch.zeros(3))
    for fused in (True, False):
        opt = torch.optim.AdamW([p], fused=fused) if fused else torch.optim.AdamW([p], foreach=False)
        CK.restore_optimizer(opt, {id(p): "w"}, {"w.exp_avg": torch.ones(3), "w.exp_avg_sq": torch.ones(3)},
                             {"w": 5.0}, Path("ckpt"))
        step = opt.state[p]["step"]
        assert step.device == p.device and step.dtype == torch.float32 and float(step) == 5.0
        p.grad = torch.ones(3)
        opt.step()  # the restored state is usable as it is
        assert float(opt.state[p]["step"]) == 6.0


def test_ddp_device_rules(monkeypatch):
    """Under torchrun each rank takes its LOCAL_RANK's GPU; a fixed other index or more ranks than GPUs is an
    error, not two ranks on one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.select_device("auto", local_rank=1, world=2) == torch.device("cuda", 1)
    assert runtime.select_device("cuda", local_rank=1, world=2) == torch.device("cuda", 1)
    assert runtime.select_device("cuda:1", local_rank=0, world=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        runtime.select_device("cuda:0", local_rank=1, world=2)
    with pytest.raises(ValueError, match="at most 2 processes"):
        runtime.select_device("auto", local_rank=2, world=3)


def test_predict_sentence_pairs_regression_and_multilabel(tiny_roberta, tmp_path, capsys, cpu_bf16):
    """predict prints a score for regression, every label above 0.5 for multilabel, and encodes pairs the way
    the tokenizer does (<s> A </s></s> B </s>): each figure equals the model's own output for that input, in the
    precision `--precision auto` chose (run with the CPU probe answering bf16 yes, then no)."""
    dtype = torch.bfloat16 if cpu_bf16 else torch.float32
    assert runtime.select_dtype("auto", torch.device("cpu")) == dtype
    model = Model.from_pretrained(tiny_roberta)
    model.add_adapter("reg", "houlsby", num_labels=1, labels=["score"], task="regression")
    model.add_adapter("ml", "lora", num_labels=3, labels=["a", "b", "c"], task="multilabel")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the adapters' weights only (the base must keep its fingerprint)
        for name in ("reg", "ml"):
            for _, p in adapter_tensors(model, name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)  # outputs far from 0 / 0.5: a wrong head shows
    model.save_adapter(tmp_path / "reg", name="reg")
    model.save_adapter(tmp_path / "ml", name="ml")
    tok = Tokenizer.from_pretrained(tiny_roberta)
    ids, mask = tok(["a great film", "dull"], ["a fine movie", "boring"])
    T = D.padded_length(ids.shape[1])  # predict pads each batch to a multiple of 16 tokens: so here
    ids = torch.nn.functional.pad(ids, (0, T - ids.shape[1]), value=tok.pad_id)
    mask = torch.nn.functional.pad(mask, (0, T - mask.shape[1]))
    same = Model.from_pretrained(tiny_roberta, dtype=dtype)  # what predict builds: the base in auto's precision
    same.load_adapter(tmp_path / "reg", name="reg").load_adapter(tmp_path / "ml", name="ml")
    with torch.no_grad():
        scores = same(ids, mask, adapter="reg")[:, 0]
        probs = same(ids, mask, adapter="ml").sigmoid()
        fp32 = model(ids, mask, adapter="reg")[:, 0]
    # bf16 moves the outputs by its rounding (~1e-2 relative) from fp32, fp32 by nothing
    assert scores.tolist() == pytest.approx(fp32.tolist(), rel=3e-2 if cpu_bf16 else 1e-6)
    pairs = ["--pair", "a great film", "a fine movie", "--pair", "dull", "boring"]
    assert predict.main(["--adapter", str(tmp_path / "reg"), "--device", "cpu", *pairs]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text_pair"] for x in lines] == ["a fine movie", "boring"]
    assert [x["score"] for x in lines] == pytest.approx(scores.tolist(), abs=1e-5)
    assert predict.main(["--adapter", str(tmp_path / "ml"), "--device", "cpu", *pairs]) == 0
    for x, p in zip((json.loads(x) for x in capsys.readouterr().out.splitlines()), probs):
        assert list(x["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-5)
        assert x["labels"] == [name for name, q in zip("abc", p) if q > 0.5]
    assert predict.main(["--adapter", str(tmp_path / "reg"), "one text", *pairs[:3]]) == 2  # mixed: refused


def test_predict_multilabel_lists_labels_by_probability(tiny_roberta, tmp_path, capsys):
    """A multilabel label is listed when its probability is above 0.5, i.e. its logit above 0: logits between 0
    and 0.5 are listed (a threshold of 0.5 on the logit would drop them)."""
    model = Model.from_pretrained(tiny_roberta)
    model.add_adapter("ml", "houlsby", num_labels=4, labels=["a", "b", "c", "d"], task="multilabel")
    with torch.no_grad():  # every text gets these logits: 0.3, -0.2, 0.05, 0.7
        model.heads["ml"].out.weight.zero_()
        model.heads["ml"].out.bias.copy_(torch.tensor([0.3, -0.2, 0.05, 0.7]))
    model.save_adapter(tmp_path / "ml", name="ml")
    assert predict.main(["--adapter", str(tmp_path / "ml"), "--device", "cpu", "--precision", "fp32",
                         "a great film"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels"] == ["a", "c", "d"]
    assert list(out["probabilities"].values()) == pytest.approx(torch.tensor([0.3, -0.2, 0.05, 0.7]).sigmoid().tolist(),
                                                               abs=1e-6)


@pytest.mark.parametrize("multiple", [16, 1])
def test_batch_lengths_round_up_to_few_shapes(tiny_roberta, cache, tmp_path, monkeypatch, capsys, multiple):
    """Every distinct batch shape costs memory that is never given back (oneDNN caches a primitive per shape), so
    train.py pads each batch to a multiple of 16 tokens: texts of 1 to 120 tokens give at most 8 lengths in
    training and evaluation together, where padding to the longest alone (--pad-multiple 1) gives dozens."""
    rng = random.Random(0)
    rows = [(" ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 110))), "pos" if i % 2 else "neg")
            for i in range(240)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    lengths = set()
    collate = D.collate

    def recording(*args, **kwargs):
        ids, mask = collate(*args, **kwargs)
        lengths.add(ids.shape[1])
        return ids, mask

    monkeypatch.setattr(D, "collate", recording)
    rc, _, err = run_main(["--data", str(data), "--output", str(tmp_path / "out"), *common(tiny_roberta, cache),
                           "--epochs", "1", "--batch-size", "4", "--pad-multiple", str(multiple)], capsys)
    assert rc == 0, err[-3000:]
    limit = Model.from_pretrained(tiny_roberta).config.max_tokens  # 128: a rounded length never passes it
    if multiple == 16:
        assert all(T % 16 == 0 or T == limit for T in lengths) and len(lengths) <= 8, sorted(lengths)
    else:
        assert len(lengths) > 30, sorted(lengths)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["peak_rss_mb"] > 0
    assert all(r["rss_mb"] > 0 for r in map(json.loads, (tmp_path / "out" / "log.jsonl").read_text().splitlines()))


def test_quantize_int8_evaluates_the_trained_adapter_on_an_int8_base(tiny_roberta, cache, tmp_path, capsys):
    """--quantize int8: training is the float run's, step for step (the same adapter file); validation and test
    run that adapter on an int8 copy of the base, so their losses move a little, not much."""
    data = write_jsonl(tmp_path / "d.jsonl", [(t, "pos" if y else "neg") for t, y in examples(100, 0)])
    runs = {}
    for name, extra in (("plain", []), ("int8", ["--quantize", "int8"])):
        out = tmp_path / name
        rc, stdout, err = run_main(["--data", str(data), "--output", str(out), *common(tiny_roberta, cache),
                                    "--precision", "fp32", *extra], capsys)
        assert rc == 0, err[-3000:]
        assert ("on an int8 copy of the base" in stdout) == (name == "int8")
        runs[name] = (check_outputs(out), load_file(out / "adapter.safetensors"))
    (m_float, w_float), (m_int8, w_int8) = runs["plain"], runs["int8"]
    assert w_float.keys() == w_int8.keys() and all(torch.equal(w_float[k], w_int8[k]) for k in w_float)
    assert m_float["eval_quantize"] is None and m_int8["eval_quantize"] == "int8"
    assert m_int8["epochs"][0]["train_loss"] == m_float["epochs"][0]["train_loss"]
    for key in ("test_loss", "val_loss"):
        a, b = m_float[key] if key == "test_loss" else m_float["epochs"][-1][key], \
            m_int8[key] if key == "test_loss" else m_int8["epochs"][-1][key]
        assert a != b and abs(a - b) < 0.01 * a, (key, a, b)
