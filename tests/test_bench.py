"""Smoke test of `python -m roberta_lite.bench` on the tiny config: it runs, both sides appear, the JSON is sane.
No timing assertions: speed is the bench's output, not something a test on a shared machine can judge."""

import json
import subprocess
import sys

import pytest

from roberta_lite import bench


def _rows(data, mode):
    return {r["label"]: r for r in data["results"][mode]}


def test_bench_tiny_both_modes(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "sub" / "bench.json"
    data = bench.main(["--config", "tiny", "--mode", "both", "--steps", "2", "--warmup", "1", "--batch", "2",
                       "--length", "32", "--fp32", "--json", str(out), "--quiet"])
    table = capsys.readouterr().out
    assert "roberta_lite bf16" in table and "transformers" in table
    written = json.loads(out.read_text())
    assert written["results"].keys() == {"train", "infer"}
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file behind
    for mode in ("train", "infer"):
        rows = written["results"][mode]
        assert {r["side"] for r in rows} == {"roberta_lite", "transformers"}
        assert {r["precision"] for r in rows} == {"bf16", "fp32"}
        for r in rows:
            assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and len(r["step_ms"]) == 2
            assert r["peak_mem_mb"] > 0 and r["step_mem_mb"] >= 0
        assert written["ratio"][mode] > 0
        assert written["transformers_attention"][mode] in ("sdpa", "eager")
    assert written["transformers_recipe"]
    # the comparison is apples to apples: in fp32 both sides compute the same logits from the same weights
    fp32 = [v for k, v in written["parity_max_abs_diff"].items() if "fp32" in k]
    assert fp32 and fp32[0] < 1e-4
    assert data["results"] == written["results"]


def test_bench_imdb_lengths_roberta_lite_alone(tmp_path):
    out = tmp_path / "bench.json"
    data = bench.main(["--config", "tiny", "--mode", "train", "--steps", "2", "--warmup", "0", "--batch", "3",
                       "--lengths", "imdb", "--no-transformers", "--attention-dropout", "0", "--json", str(out),
                       "--quiet"])
    assert [r["side"] for r in data["results"]["train"]] == ["roberta_lite"]
    assert data["results"]["train"][0]["tokens_per_s"] > 0
    assert data["notes"] and data["ratio"]["train"] is None
    assert 0 <= data["padding_fraction"] < 1
    assert data["dropout"]["attention"] == 0.0


def test_imdb_lengths_look_like_imdb():
    import numpy as np

    lengths = bench.sample_lengths("imdb", 20000, 0, 512, np.random.default_rng(0))
    assert 200 <= float(np.median(lengths)) <= 260
    assert max(lengths) == 512 and min(lengths) >= 8
    assert 0.05 < np.mean(np.array(lengths) == 512) < 0.25  # the long tail is cut, as truncation does


def test_batches_padded_to_longest_and_same_for_everyone():
    import torch

    a = bench.make_batches("imdb", 3, 4, 0, 1000, 512, False, 7, torch.device("cpu"))
    b = bench.make_batches("imdb", 3, 4, 0, 1000, 512, False, 7, torch.device("cpu"))
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.mask, y.mask)
        assert x.ids.shape[1] == max(x.lengths) and int(x.mask.sum()) == x.real_tokens
        assert bool((x.ids[x.mask == 0] == 1).all())  # padding is <pad>


def test_flop_model():
    cfg = bench.CONFIGS["base"]
    fwd = bench.flops(cfg, 8, 256, train=False)
    # roberta-base: ~85M matmul weights in the layers -> ~2 * 85M FLOPs per token, plus attention
    assert 2 * 84e6 * 8 * 256 < fwd < 2 * 90e6 * 8 * 256 + 12 * 4 * 256 * 256 * 768 * 8
    assert 1.8 * fwd < bench.flops(cfg, 8, 256, train=True) < 2.1 * fwd


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "roberta_lite.bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--lengths" in r.stdout
