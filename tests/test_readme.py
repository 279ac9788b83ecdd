"""The README's code runs as written: its Python blocks in order on a tiny local checkpoint (in place of the
roberta-base hub id), its train.py lines through train.py's own parser, and its predict line on an adapter saved
where the line looks for it. A README that drifts from the code fails here."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the top-level script)
from roberta_lite import Model, predict  # noqa: E402

README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def command_lines(prefix: str) -> list[list[str]]:
    """The arguments of every README bash line that runs `prefix`, comments dropped."""
    lines = [line for block in blocks("bash") for line in block.splitlines()]
    return [shlex.split(line, comments=True)[len(shlex.split(prefix)):] for line in lines
            if prefix in line and not line.lstrip().startswith("#")]


def test_python_blocks_run_in_order(tiny_roberta, tmp_path, monkeypatch):
    code = blocks("python")
    assert len(code) >= 2, "the README's Python examples were not found"
    monkeypatch.chdir(tmp_path)  # relative paths in the examples (weights/adapters/..., out/...) land here
    namespace: dict = {}
    for i, block in enumerate(code):
        source = block.replace('"roberta-base"', repr(str(tiny_roberta)))
        exec(compile(source, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "weights" / "adapters" / "my-sentiment" / "adapter.safetensors").is_file()
    model = namespace["model"]
    assert model.adapter_names == ["sentiment", "nli", "sentiment-2", "ner"]  # "topic" deleted
    ids, mask = namespace["ids"], namespace["mask"]
    assert model(ids, mask, adapter="ner").shape == (*ids.shape, 3)  # the block's comment: (B, T, 3)


def test_train_lines_parse():
    lines = [argv for argv in command_lines("train.py")]
    assert len(lines) >= 8, "the README's train.py lines were not found"
    for argv in lines:
        argv = argv[argv.index("--data"):] if "--data" in argv else argv  # torchrun's own flags go first
        train.parse_args(argv)  # argparse exits on an unknown flag or a bad value


def test_predict_lines_run(tiny_roberta, tmp_path, monkeypatch, capsys):
    lines = command_lines("python -m roberta_lite.predict")
    assert len(lines) >= 2  # the Training section's and the int8 section's (--quantize int8)
    monkeypatch.chdir(tmp_path)
    for argv in lines:
        where = argv[argv.index("--adapter") + 1]
        model = Model.from_pretrained(tiny_roberta)
        model.add_adapter("imdb", "houlsby", labels=["neg", "pos"])
        model.save_adapter(where)
        assert predict.main([*argv, "--precision", "fp32"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        texts = [a for i, a in enumerate(argv) if not a.startswith("--") and not argv[i - 1].startswith("--")]
        assert [r["text"] for r in rows] == texts
        assert all(r["label"] in ("neg", "pos") for r in rows)


@pytest.mark.parametrize("prefix", ["train.py", "python -m roberta_lite.predict"])
def test_command_lines_are_found(prefix):
    assert command_lines(prefix)
