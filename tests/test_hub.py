"""Downloads from the Hub, for real but offline: huggingface_hub talks HTTP to a stand-in hub on 127.0.0.1.

Everything huggingface_hub and roberta_lite write (HF_HOME, the hub cache, weights/, ~/.cache/roberta_lite) goes
under tmp_path. The repository served is a tiny random RobertaForMaskedLM saved by transformers, its tokenizer,
and two files a download must leave alone (a pickled .bin, a README).
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from hubserver import HubServer, reset_sessions, set_offline, use_hub
from roberta_lite import Model, Tokenizer
from roberta_lite import runtime

REPO = "someorg/tiny-roberta"
TEXT = "The film was wonderful, really quite moving."


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running stand-in hub (nothing served yet), with huggingface_hub and every cache pointed under tmp_path."""
    server = HubServer()
    endpoint = server.serve({})
    use_hub(monkeypatch, endpoint, tmp_path / "hf_home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # roberta_lite's own cache (data.cache_dir)
    monkeypatch.chdir(tmp_path)  # train.py and predict download into ./weights/
    yield server
    server.close()
    monkeypatch.undo()  # the library's constants first, then sessions built from them
    reset_sessions()


@pytest.fixture
def repo_files(tiny_roberta) -> dict[str, bytes]:
    """The files of REPO: a tiny checkpoint, its tokenizer.json, and two files no download should fetch."""
    files = {p.name: p.read_bytes() for p in sorted(tiny_roberta.iterdir()) if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    return {**files, "pytorch_model.bin": b"not to be fetched, let alone unpickled", "README.md": b"# tiny\n"}


def fetched(hub: HubServer) -> list[str]:
    """Names of the files whose bytes were downloaded (a CDN path is named by the file it holds)."""
    by_sha = {sha: name for repo in hub.repos.values() for name, sha in repo.sha256.items()}
    return [by_sha[p.rsplit("/", 1)[1]] if p.startswith("/cdn/") else p.rsplit("/", 1)[1] for p in hub.downloads()]


def same_weights(a: Model, b: Model) -> bool:
    """Every tensor read from the checkpoint is equal (the classifier head is new, randomly initialised, in both)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def test_model_downloads_once_and_equals_the_local_load(hub, repo_files, tiny_roberta, tmp_path):
    """The first load fetches config + weights (not the .bin), into the hub cache under HF_HOME; the second
    fetches nothing; both give the same tensors as loading the directory itself."""
    hub.serve({REPO: repo_files})
    model = Model.from_pretrained(REPO)
    assert sorted(set(fetched(hub))) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert len(fetched(hub)) == 3, "a file was downloaded twice"
    snapshot = tmp_path / "hf_home" / "hub" / "models--someorg--tiny-roberta" / "snapshots" / hub.commit(REPO)
    assert (snapshot / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    assert same_weights(model, Model.from_pretrained(tiny_roberta))

    again = Model.from_pretrained(REPO)
    assert len(fetched(hub)) == 3, "the second load downloaded again instead of using the cache"
    assert same_weights(again, model)


def test_tokenizer_downloads_once_and_equals_the_local_load(hub, shared_dir, tmp_path):
    """roberta-base's real tokenizer files, served as a repo: the hub id gives the same ids as the directory."""
    local = tmp_path / "roberta-tokenizer"
    local.mkdir()
    names = ("tokenizer.json", "vocab.json", "merges.txt")
    for name in names:
        if not (shared_dir / "roberta-base" / name).is_file():
            pytest.skip(f"{shared_dir / 'roberta-base' / name} is absent")
        shutil.copy(shared_dir / "roberta-base" / name, local / name)
    hub.serve({"FacebookAI/roberta-base": {n: (local / n).read_bytes() for n in names}})

    tok = Tokenizer.from_pretrained("FacebookAI/roberta-base")
    expected = Tokenizer.from_pretrained(local)
    assert tok.encode(TEXT) == expected.encode(TEXT) and tok.fingerprint == expected.fingerprint
    assert tok.encode(TEXT)[:3] == [0, 133, 822]  # <s> The film: roberta-base's own ids, not a stand-in's
    assert sorted(fetched(hub)) == sorted(names)
    Tokenizer.from_pretrained("FacebookAI/roberta-base")
    assert len(fetched(hub)) == len(names), "the second load downloaded again instead of using the cache"


def test_offline_after_a_download_loads_from_the_cache_without_a_request(hub, repo_files, monkeypatch):
    hub.serve({REPO: repo_files})
    model, tok = Model.from_pretrained(REPO), Tokenizer.from_pretrained(REPO)
    set_offline(monkeypatch, True)
    hub.log.clear()
    assert same_weights(Model.from_pretrained(REPO), model)
    assert Tokenizer.from_pretrained(REPO).encode(TEXT) == tok.encode(TEXT)
    assert hub.log == [], "HF_HUB_OFFLINE=1 still sent requests"


def test_offline_before_any_download_says_to_pass_a_local_directory(hub, repo_files, monkeypatch):
    hub.serve({REPO: repo_files})
    set_offline(monkeypatch, True)
    for load in (Model.from_pretrained, Tokenizer.from_pretrained, runtime.resolve_base):
        with pytest.raises(FileNotFoundError) as e:
            load(REPO)
        message = str(e.value)
        assert repr(REPO) in message and "local" in message and "directory" in message, message
        assert "\n" not in message, "the CLIs print errors on one line"
    assert hub.log == []
    assert not (Path("weights") / REPO).exists(), "resolve_base left an empty weights/<id>/ behind"


def test_a_missing_repo_is_named_in_the_error(hub, repo_files):
    hub.serve({REPO: repo_files})
    for load in (Model.from_pretrained, Tokenizer.from_pretrained, runtime.resolve_base):
        with pytest.raises(FileNotFoundError) as e:
            load("someorg/no-such-model")
        message = str(e.value)
        assert "'someorg/no-such-model'" in message and "not found" in message.lower(), message
        assert "\n" not in message
    assert ("GET", "/api/models/someorg/no-such-model/revision/main") in hub.log
    assert not (Path("weights") / "someorg" / "no-such-model").exists()


def test_a_cut_off_download_fails_and_a_retry_completes_it(hub, repo_files, tiny_roberta, monkeypatch):
    """The server sends 1000 of model.safetensors' bytes and hangs up: the load fails, nothing half-written
    passes for the file (not even offline, where huggingface_hub falls back on what is on disk), and once the
    server is fixed the next load resumes and gets the right tensors."""
    hub.serve({REPO: repo_files})
    hub.cut["model.safetensors"] = 1000
    with pytest.raises(FileNotFoundError, match="someorg/tiny-roberta"):
        Model.from_pretrained(REPO)
    set_offline(monkeypatch, True)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):  # 0.x: in the snapshot; 1.x: missing from it
        Model.from_pretrained(REPO)
    set_offline(monkeypatch, False)
    del hub.cut["model.safetensors"]
    assert same_weights(Model.from_pretrained(REPO), Model.from_pretrained(tiny_roberta))


def test_resolve_base_downloads_into_weights_once(hub, repo_files, tiny_roberta):
    """train.py's and predict's base model: fetched into ./weights/<id>/ and recorded by its id; the next run
    finds it complete there and asks the hub nothing."""
    hub.serve({REPO: repo_files})
    root, name = runtime.resolve_base(REPO)
    assert (root, name) == ((Path("weights") / REPO).resolve(), REPO)
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    assert same_weights(Model.from_pretrained(root), Model.from_pretrained(tiny_roberta))
    hub.log.clear()
    assert runtime.resolve_base(REPO) == (root, name)
    assert hub.log == []


def test_resolve_base_after_a_cut_off_download(hub, repo_files, tiny_roberta, monkeypatch):
    """A cut-off transfer into weights/<id>/ fails, leaves no file that passes for the weights (online or
    offline), and the next run completes it."""
    hub.serve({REPO: repo_files})
    hub.cut["model.safetensors"] = 1000
    with pytest.raises(FileNotFoundError, match="someorg/tiny-roberta"):
        runtime.resolve_base(REPO)
    assert not (Path("weights") / REPO / "model.safetensors").exists()
    set_offline(monkeypatch, True)  # huggingface_hub now returns the half-filled weights/<id>/ as it is
    with pytest.raises(FileNotFoundError, match="'someorg/tiny-roberta': .* is incomplete"):
        runtime.resolve_base(REPO)
    set_offline(monkeypatch, False)
    del hub.cut["model.safetensors"]
    root, _ = runtime.resolve_base(REPO)
    assert same_weights(Model.from_pretrained(root), Model.from_pretrained(tiny_roberta))


def test_the_stand_in_hub_listens_on_loopback_only_and_stops():
    server = HubServer()
    address = urlsplit(server.serve({})).netloc.split(":")
    assert address[0] == "127.0.0.1"
    server.close()
    with pytest.raises(OSError):
        socket.create_connection((address[0], int(address[1])), timeout=1).close()


# ---------------------------------------------------------------------------------------------- adapters by hub id

ADAPTER_REPO = "someorg/adapter-repo"


def adapter_logits(model: Model, adapter: str | None = None) -> torch.Tensor:
    from test_parity import batch

    ids, mask = batch(model.config.vocab_size, model.config.pad_id)
    with torch.no_grad():
        return model(ids, mask, adapter=adapter)


def directory_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_load_adapter_from_an_adapterhub_repo(hub, repo_files, tiny_roberta, tmp_path):
    """A repository holding what the `adapters` library's save_adapter writes by default (pickled .bin weights,
    read with weights_only): fetched once, computed as the library computes it, beside adapters already there."""
    adapters = pytest.importorskip("adapters")
    from test_adapterhub import randomize
    from test_parity import batch

    lib = adapters.AutoAdapterModel.from_pretrained(str(tiny_roberta))
    lib.add_adapter("sst", config=adapters.DoubleSeqBnConfig(reduction_factor=8))
    lib.add_classification_head("sst", num_labels=2, id2label={0: "neg", 1: "pos"})
    lib.set_active_adapters("sst")
    randomize(lib, ("adapters.sst.", "heads.sst."), seed=4)
    lib.save_adapter(str(tmp_path / "saved"), "sst")
    hub.serve({REPO: repo_files, ADAPTER_REPO: {**directory_files(tmp_path / "saved"), "README.md": b"# sst\n"}})

    model = Model.from_pretrained(REPO).add_adapter("other", "pfeiffer")
    before = adapter_logits(model, "other")
    model.load_adapter(ADAPTER_REPO)
    assert model.adapter_names == ["other", "sst"] and model.active_adapter == "sst"
    assert model.labels == ["neg", "pos"]
    ids, mask = batch(model.config.vocab_size, model.config.pad_id)
    with torch.no_grad():
        want = lib.eval()(input_ids=ids, attention_mask=mask).logits
    assert (adapter_logits(model) - want).abs().max() <= 1e-4
    assert torch.equal(adapter_logits(model, "other"), before)
    assert sorted(n for n in fetched(hub) if n not in repo_files) == [
        "adapter_config.json", "head_config.json", "pytorch_adapter.bin", "pytorch_model_head.bin"]
    n = len(fetched(hub))
    Model.from_pretrained(REPO).load_adapter(ADAPTER_REPO)
    assert len(fetched(hub)) == n, "the second load downloaded again instead of using the cache"


def test_load_adapter_from_a_native_repo_and_mix_it(hub, repo_files, tiny_roberta, tmp_path):
    """roberta_lite's own adapter files, served as a repository: loaded by id onto a base loaded by id, equal to
    the adapter it was saved from, and usable in a mixed batch beside a local one."""
    trained = Model.from_pretrained(tiny_roberta).add_adapter("topic", "houlsby", num_labels=3,
                                                              labels=["x", "y", "z"])
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if ".topic." in name:
                p.normal_(std=0.3)
    trained.save_adapter(tmp_path / "topic")
    hub.serve({REPO: repo_files, ADAPTER_REPO: directory_files(tmp_path / "topic")})

    model = Model.from_pretrained(REPO).add_adapter("plain", "pfeiffer", num_labels=2)
    model.load_adapter(ADAPTER_REPO)
    assert model.adapter_names == ["plain", "topic"] and model.labels == ["x", "y", "z"]
    assert torch.equal(adapter_logits(model), adapter_logits(trained))
    mixed = adapter_logits(model, ["topic", "plain", "topic", "plain"])
    assert (mixed[[0, 2]] - adapter_logits(trained)[[0, 2]]).abs().max() <= 1e-5
    assert torch.isinf(mixed[[1, 3], 2]).all()


def test_a_missing_adapter_repo_is_named_and_changes_nothing(hub, repo_files):
    hub.serve({REPO: repo_files})
    model = Model.from_pretrained(REPO).add_adapter("kept", "houlsby")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError) as e:
        model.load_adapter("someorg/no-such-adapter")
    assert "'someorg/no-such-adapter'" in str(e.value) and "\n" not in str(e.value)
    assert model.adapter_names == ["kept"] and model.active_adapter == "kept"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_peft_repo_is_named_after_the_repository(hub, repo_files, tiny_roberta, tmp_path):
    """peft files hold no name: a local directory gives its own, a hub download (whose directory is the snapshot's
    commit hash) the repository's."""
    trained = Model.from_pretrained(tiny_roberta).add_adapter("lora", "lora", num_labels=2)
    trained.save_adapter(tmp_path / "lora", format="peft")
    hub.serve({REPO: repo_files, ADAPTER_REPO: directory_files(tmp_path / "lora")})
    model = Model.from_pretrained(REPO).load_adapter(ADAPTER_REPO)
    assert model.adapter_names == ["adapter-repo"]
