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
                       "--length", "32", "--precision", "bf16", "--fp32", "--json", str(out), "--quiet"])
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
        # each row against transformers in its own precision, and (the older field) against transformers bf16
        hf = {r["precision"]: r for r in rows if r["side"] == "transformers"}
        for r in rows:
            assert r["x_vs_transformers"] == pytest.approx(r["tokens_per_s"] / hf[r["precision"]]["tokens_per_s"])
            assert r["x_vs_transformers_bf16"] == pytest.approx(r["tokens_per_s"] / hf["bf16"]["tokens_per_s"])
        assert written["ratio"][mode] == _rows(written, mode)["roberta_lite bf16"]["x_vs_transformers"]
    assert written["precision"] == "bf16" and written["precision_requested"] == "bf16"
    assert written["transformers_recipe"]
    # the comparison is apples to apples: in fp32 both sides compute the same logits from the same weights
    fp32 = [v for k, v in written["parity_max_abs_diff"].items() if "fp32" in k]
    assert fp32 and fp32[0] < 1e-4
    assert data["results"] == written["results"]


def test_bench_classic_fp32(capsys):
    """--precision fp32 in the roberta_lite-vs-transformers mode: both sides' main rows are fp32 (transformers without
    autocast), the ratios are against transformers fp32, and --fp32 beside it adds no second set of rows."""
    pytest.importorskip("transformers")
    data = bench.main(["--config", "tiny", "--mode", "both", "--steps", "2", "--warmup", "0", "--batch", "2",
                       "--length", "16", "--precision", "fp32", "--fp32", "--quiet"])
    table = capsys.readouterr().out
    assert data["precision"] == "fp32" and data["precision_requested"] == "fp32"
    assert "transformers_recipe" in data and "autocast(" not in data["transformers_recipe"]
    for mode in ("train", "infer"):
        rows = data["results"][mode]
        impl = data["transformers_attention"][mode]
        assert [(r["label"], r["side"], r["precision"]) for r in rows] == [
            ("roberta_lite fp32", "roberta_lite", "fp32"), (f"transformers fp32 {impl}", "transformers", "fp32")]
        lite, hf = rows
        assert lite["x_vs_transformers"] == pytest.approx(lite["tokens_per_s"] / hf["tokens_per_s"])
        assert hf["x_vs_transformers"] == pytest.approx(1.0)
        assert lite["x_vs_transformers_bf16"] is None  # no transformers bf16 row to compare with
        assert data["ratio"][mode] == lite["x_vs_transformers"]
        assert all(0 < r["fraction_of_matmul_peak"] for r in rows)
        assert f"{mode}: roberta_lite fp32 / transformers fp32 {impl} = " in table
    parity = data["parity_max_abs_diff"]
    assert set(parity) == {f"roberta_lite fp32 vs transformers fp32 {data['transformers_attention']['train']}",
                           "max |logit| (scale)"}
    assert next(v for k, v in parity.items() if "fp32" in k) < 1e-4
    assert any("--fp32" in n for n in data["notes"])
    assert "precision fp32 (--precision fp32)" in table


def test_bench_classic_precision_auto(cpu_bf16):
    """--precision auto (the default) in the roberta_lite-vs-transformers mode resolves as runtime.select_dtype
    does: bf16 rows (transformers under bf16 autocast) with native bf16, fp32 rows without; the CPU's answer is
    faked both ways, so neither case depends on this machine."""
    pytest.importorskip("transformers")
    import torch

    from roberta_lite import runtime

    want = "bf16" if runtime.select_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "fp32"
    assert want == ("bf16" if cpu_bf16 else "fp32")
    data = bench.main(["--config", "tiny", "--mode", "infer", "--steps", "1", "--warmup", "0", "--batch", "2",
                       "--length", "16", "--hf-attn", "sdpa", "--quiet"])
    assert data["precision"] == want and data["precision_requested"] == "auto"
    rows = data["results"]["infer"]
    hf_label = "transformers bf16-autocast sdpa" if want == "bf16" else "transformers fp32 sdpa"
    assert [(r["label"], r["precision"]) for r in rows] == [(f"roberta_lite {want}", want), (hf_label, want)]
    assert data["ratio"]["infer"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"])
    assert ("autocast(" in data["transformers_recipe"]) == (want == "bf16")


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


def test_bench_many_adapters_tiny(tmp_path):
    """--adapters: three rows per mode on the same batches; the mixed batch computes what the separate passes do."""
    out = tmp_path / "many.json"
    data = bench.main(["--config", "tiny", "--adapters", "3", "--batch", "6", "--length", "16", "--steps", "2",
                       "--warmup", "0", "--precision", "fp32", "--json", str(out), "--quiet"])
    assert json.loads(out.read_text())["ratio"] == data["ratio"]
    assert data["names_per_example"] == ["task0", "task1", "task2"] * 2
    for mode in ("train", "infer"):
        labels = [r["label"] for r in data["results"][mode]]
        assert labels == ["1 adapter (6 x task0) fp32", "3 adapters mixed (1 pass) fp32", "3 adapters, 3 passes fp32"]
        assert all(r["tokens_per_s"] > 0 and r["fraction_of_matmul_peak"] > 0 for r in data["results"][mode])
        assert set(data["ratio"][mode]) == {"mixed / one adapter", "separate / mixed"}
    parity = data["parity_max_abs_diff"]
    assert parity["mixed vs separate passes"] < 1e-5 and parity["mixed vs one adapter (task0's examples)"] < 1e-5
    assert data["matmul_peak_tflops"]["fp32"] > 0


def test_bench_lora_tiny(tmp_path):
    """--adapter lora: roberta_lite and peft compute the same LoRA (fp32 parity far below the LoRA's own effect);
    inference times the merged LoRA beside the plain base."""
    pytest.importorskip("peft")
    data = bench.main(["--config", "tiny", "--adapter", "lora", "--batch", "2", "--length", "16", "--steps", "2",
                       "--warmup", "0", "--hf-attn", "sdpa", "--precision", "fp32", "--quiet"])
    assert [r["side"] for r in data["results"]["train"]] == ["roberta_lite", "transformers"]
    assert [r["label"] for r in data["results"]["infer"]][:3] == [
        "roberta_lite fp32 LoRA merged", "roberta_lite fp32 base, no adapter", "roberta_lite fp32 LoRA"]
    parity = data["parity_max_abs_diff"]
    effect = parity["fp32: LoRA's own effect (roberta_lite with vs without it)"]
    assert parity["fp32: roberta_lite LoRA vs transformers+peft"] < effect / 100
    assert parity["roberta_lite fp32 LoRA vs roberta_lite fp32 LoRA merged"] < effect / 100
    assert {"train: roberta_lite / peft tok/s", "infer: merged / plain base step time"} <= set(data["ratio"])
    assert data["adapter"]["kind"] == "lora" and data["adapter"]["targets"] == ["query", "value"]


def test_bench_token_classification_tiny():
    """--task token-classification: a token head against RobertaForTokenClassification holding the same adapters
    and classifier (fp32 parity), labels on every real token, the head's FLOPs counted on every token."""
    pytest.importorskip("transformers")
    data = bench.main(["--config", "tiny", "--task", "token-classification", "--batch", "2", "--length", "16",
                       "--steps", "2", "--warmup", "0", "--hf-attn", "sdpa", "--precision", "fp32", "--quiet"])
    assert data["task"] == "token-classification" and "RobertaForTokenClassification" in data["transformers_recipe"]
    for mode in ("train", "infer"):
        assert [r["side"] for r in data["results"][mode]] == ["roberta_lite", "transformers"]
        assert data["ratio"][mode] > 0
    parity = data["parity_max_abs_diff"]
    assert parity["roberta_lite fp32 vs transformers fp32 sdpa"] < 1e-4 < parity["max |logit| (scale)"]
    cfg = bench.CONFIGS["base"]
    token_head = bench.flops(cfg, 8, 256, False, task="token-classification") - bench.flops(cfg, 8, 256, False)
    assert token_head == 2 * 768 * bench.TOKEN_LABELS * 8 * 256 - 2 * (768 * 768 + 768 * bench.NUM_LABELS) * 8


@pytest.mark.parametrize("argv", [["--adapters", "1"], ["--adapters", "9", "--batch", "8"],
                                  ["--adapters", "2", "--fp32"], ["--adapter", "lora", "--lengths", "imdb"],
                                  ["--adapters", "2", "--adapter", "lora"], ["--precision", "fp16"],
                                  ["--task", "token-classification", "--adapter", "lora"]])
def test_bench_refuses_mode_combinations(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_adapter_flops():
    cfg = bench.CONFIGS["base"]
    assert bench.adapter_weights(cfg, bench.ADAPTER) == 2 * 2 * 768 * 48  # Houlsby: two per layer, 768 -> 48 -> 768
    assert bench.adapter_weights(cfg, bench.LORA) == 2 * 8 * (768 + 768)  # query and value, r 8
    assert bench.adapter_weights(cfg, None) == 0
    base = bench.flops(cfg, 8, 256, train=False, adapter=None)
    assert base < bench.flops(cfg, 8, 256, train=False, adapter=bench.LORA) < bench.flops(cfg, 8, 256, train=False)
    # a LoRA on query/value trains through layer 0's attention core, which a Houlsby adapter never needs
    core = 4 * 256 * 256 * 768 * 8
    lora_bwd = bench.flops(cfg, 8, 256, True, bench.LORA) - bench.flops(cfg, 8, 256, False, bench.LORA)
    houlsby_bwd = bench.flops(cfg, 8, 256, True) - bench.flops(cfg, 8, 256, False)
    per_weight = 2 * 12 * 2 * 8 * 256  # input and weight gradients, 2 FLOPs per weight, 12 layers, 8 x 256 tokens
    more = bench.adapter_weights(cfg, bench.LORA) - bench.adapter_weights(cfg, bench.ADAPTER)
    assert lora_bwd - houlsby_bwd == 2 * core + per_weight * more


def test_bench_int8_rows(tmp_path, capsys):
    """--int8: roberta_lite int8 beside its float row, transformers fp32/bf16 and + torch int8, and ONNX Runtime
    int8 when onnxruntime is installed (else a note says it is left out); every row's logits near fp32's."""
    pytest.importorskip("transformers")
    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
    out = tmp_path / "int8.json"
    data = bench.main(["--int8", "--config", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--length",
                       "32", "--precision", "bf16", "--json", str(out), "--quiet"])
    assert "roberta_lite int8" in capsys.readouterr().out
    rows = _rows(json.loads(out.read_text()), "infer")
    want = {"roberta_lite int8", "roberta_lite bf16", "transformers fp32 sdpa", "transformers bf16-autocast sdpa",
            "transformers fp32 sdpa + torch int8"} | ({"onnxruntime int8"} if have_ort else set())
    assert set(rows) == want
    assert any("onnxruntime is not installed" in n for n in data["notes"]) != have_ort
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["x_vs_roberta_lite_int8"] == pytest.approx(r["tokens_per_s"] / rows["roberta_lite int8"]["tokens_per_s"])
    assert data["matmul_peak_tflops"]["int8"] > 0 and "fraction_of_matmul_peak" in rows["roberta_lite int8"]
    errors = data["logits_relative_error_vs_roberta_lite_fp32"]
    assert set(errors) == want and errors["transformers fp32 sdpa"] < 1e-5
    assert all(errors[k] < 0.1 for k in want)  # int8 rows: a few percent at most on the tiny model
    with pytest.raises(SystemExit):
        bench.main(["--int8", "--adapter", "lora", "--config", "tiny"])
