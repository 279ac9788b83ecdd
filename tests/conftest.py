"""Shared fixtures: a tiny random RoBERTa checkpoint (as transformers saves one) and the location of ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # test data and tools beside the repository; tests that need them skip without

# Words the tiny tokenizer is trained on: tests that generate text should draw from these.
TINY_WORDS = ("good great wonderful excellent superb lovely brilliant delightful moving charming "
              "bad awful terrible boring dull poor dreadful horrible tedious weak "
              "the a film movie plot acting story was is and it this very quite really").split()


def save_tiny_roberta(directory: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                      max_tokens: int = 128, seed: int = 0) -> Path:
    """Write a tiny random RobertaForMaskedLM (config.json, model.safetensors) and a byte-level BPE
    tokenizer.json with RoBERTa's special tokens (<s>=0, <pad>=1, </s>=2) into `directory`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaForMaskedLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(TINY_WORDS[i:] + TINY_WORDS[:i]) for i in range(len(TINY_WORDS))]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(directory / "tokenizer.json"))

    config = RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden,
                           max_position_embeddings=max_tokens + 2, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    RobertaForMaskedLM(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A tiny random RoBERTa checkpoint directory with its tokenizer (2 layers, hidden 32, 128 tokens)."""
    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repository; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(params=[True, False], ids=["cpu-bf16", "cpu-no-bf16"])
def cpu_bf16(request, monkeypatch) -> bool:
    """Runs a test twice, with the CPU probe behind `--precision auto` answering "native bf16" and then "none", so
    both branches of auto are tested on whatever CPU runs the suite (AVX2-only and AVX512-BF16 machines alike)."""
    from roberta_lite import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: request.param)
    return request.param
