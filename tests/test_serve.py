"""The HTTP server: live on 127.0.0.1 (a free port), queried with a real HTTP client.

Adapters of every kind and task on one tiny base, with random non-zero weights so that a row answered by the wrong
adapter shows: "sentiment" Houlsby (2 labels), "nli" Pfeiffer on pairs (3 labels), "sts" LoRA regression, "tags"
Houlsby multilabel (4 labels), "lo" LoRA classification (served merged in its own test). Everything runs in fp32,
so outputs are compared with Model's own to 1e-5 on any CPU. No timing asserts: where a test needs requests to
meet in the queue, it holds the worker with a command and polls (a bounded number of times) until they are queued.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from conftest import REPO, save_tiny_roberta  # noqa: E402
from roberta_lite import AdapterConfig, Model, Tokenizer  # noqa: E402
from roberta_lite.serve import Limits, bind, load_service, main, make_app  # noqa: E402

ADAPTERS = {  # name: (config, num_labels, task, labels)
    "sentiment": ("houlsby", 2, "classification", ["neg", "pos"]),
    "nli": (AdapterConfig("pfeiffer", reduction_factor=8), 3, "classification", ["entail", "neutral", "contra"]),
    "sts": (AdapterConfig("lora", r=4, alpha=8, targets=("query", "value", "ffn_up")), 1, "regression", None),
    "tags": ("houlsby", 4, "multilabel", ["plot", "acting", "music", "length"]),
    "lo": (AdapterConfig("lora", r=4, alpha=8), 2, "classification", ["no", "yes"]),
    "ner": ("houlsby", 5, "token-classification", ["O", "B-person", "I-person", "B-place", "I-place"]),
}
SERVED = ["sentiment", "nli", "sts", "tags"]
TEXTS = ["a good film", "the plot was dull and the acting was weak", "wonderful", "",
         "really quite boring " * 60]  # the last one is over the tiny model's 128 tokens: truncated
PAIRS = [["the film was good", "it was great"], ["a dull plot", "the story was superb and moving"]]
TOL = 1e-5
REQUEST_TIMEOUT = 60  # seconds: bounds every wait on the server


def add_random(model: Model, name: str, seed: int):
    cfg, k, task, labels = ADAPTERS[name]
    model.add_adapter(name, cfg, num_labels=k, labels=labels, task=task)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def files(tiny_roberta, tmp_path_factory) -> dict[str, Path]:
    """Each adapter saved in its own directory, plus "other": an adapter of another base."""
    root = tmp_path_factory.mktemp("serve-adapters")
    model = Model.from_pretrained(tiny_roberta)
    for seed, name in enumerate(ADAPTERS):
        add_random(model, name, seed)
        model.save_adapter(root / name, name=name)
    other_base = save_tiny_roberta(root / "other-base", seed=1)
    other = Model.from_pretrained(other_base)
    add_random(other, "sentiment", 0)
    other.save_adapter(root / "other", name="sentiment")
    bad = root / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    return {**{n: root / n for n in ADAPTERS}, "other": root / "other", "bad": bad}


def expected(base: Path, source: Path, inputs: list) -> list[torch.Tensor]:
    """Model's own logits for each input, alone in its batch (no padding), fp32."""
    model = Model.from_pretrained(base, dtype=torch.float32).load_adapter(source).eval()
    tok = Tokenizer.from_pretrained(base)
    out = []
    with torch.inference_mode():
        for x in inputs:
            n = model.config.max_tokens  # truncated as predict does (the last </s> kept)
            ids, mask = tok(x, max_length=n) if isinstance(x, str) else tok([x[0]], [x[1]], max_length=n)
            out.append(model(ids, mask)[0])
    return out


def check_output(out: dict, logits: torch.Tensor, task: str, labels: list[str]):
    if task == "regression":
        assert set(out) == {"score"}
        assert math.isclose(out["score"], float(logits[0]), abs_tol=TOL)
        return
    p = logits.sigmoid() if task == "multilabel" else logits.softmax(-1)
    assert list(out["probabilities"]) == labels
    for label, q in zip(labels, p):
        assert math.isclose(out["probabilities"][label], float(q), abs_tol=TOL), (label, out, p)
    if task == "multilabel":
        assert out["labels"] == [label for label, q in zip(labels, p) if q > 0.5]
    else:
        assert out["label"] == labels[int(p.argmax())]
        assert math.isclose(out["probability"], float(p.max()), abs_tol=TOL)


class Live:
    """A server in a thread of this process, on a free port of 127.0.0.1; `service` is reachable for tests."""

    def __init__(self, base: Path, adapters: dict[str, Path], **options):
        options.setdefault("precision", "fp32")
        self.service = load_service(str(base), {n: str(p) for n, p in adapters.items()}, device="cpu", **options)
        sock = bind("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT)
        for _ in range(200):  # bounded: the server is up within a few seconds
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.client.get("/health").json()["status"] == "ok"

    def predict(self, adapter, inputs, **kw) -> httpx.Response:
        return self.client.post("/v1/predict", json={"adapter": adapter, "inputs": inputs}, **kw)

    def hold(self) -> threading.Event:
        """Keep the worker busy (a command that waits) until the returned event is set."""
        release = threading.Event()
        self.service.batcher.call(lambda _: release.wait(REQUEST_TIMEOUT))
        return release

    def wait_queued(self, texts: int):
        for _ in range(400):  # bounded poll
            if self.service.metrics.queued >= texts:
                return
            time.sleep(0.025)
        raise AssertionError(f"only {self.service.metrics.queued} texts ever queued, expected {texts}")

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(REQUEST_TIMEOUT)
        assert not self.thread.is_alive()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def live(tiny_roberta, files):
    server = Live(tiny_roberta, {n: files[n] for n in SERVED}, admin_token="s3cret",
                  limits=Limits(max_body_bytes=1 << 20, max_inputs=64, max_chars=50_000))
    yield server
    server.close()


def test_outputs_equal_models_own_for_every_adapter_in_mixed_passes(live, tiny_roberta, files):
    inputs = {"sentiment": TEXTS, "nli": PAIRS + TEXTS[:2], "sts": PAIRS + TEXTS, "tags": TEXTS[::-1]}
    release = live.hold()  # all four requests wait in the queue, then share passes
    with ThreadPoolExecutor(4) as pool:
        futures = {n: pool.submit(live.predict, n, x) for n, x in inputs.items()}
        live.wait_queued(sum(map(len, inputs.values())))
        release.set()
        answers = {n: f.result() for n, f in futures.items()}
    for name, x in inputs.items():
        assert answers[name].status_code == 200, answers[name].text
        outs = answers[name].json()["outputs"]
        assert len(outs) == len(x)
        _, _, task, labels = ADAPTERS[name]
        labels = labels or ["LABEL_0"]
        for out, logits in zip(outs, expected(tiny_roberta, files[name], x)):
            check_output(out, logits, task, labels)


def test_adapters_listed_with_kind_task_and_labels(live):
    got = {a["name"]: a for a in live.client.get("/v1/adapters").json()["adapters"]}
    assert list(got) == SERVED
    assert got["nli"] == {"name": "nli", "kind": "pfeiffer", "task": "classification",
                          "labels": ["entail", "neutral", "contra"], "merged": False}
    assert (got["sts"]["kind"], got["sts"]["task"]) == ("lora", "regression")
    assert (got["tags"]["task"], got["tags"]["labels"]) == ("multilabel", ADAPTERS["tags"][3])
    assert live.client.get("/health").json() == {"status": "ok", "adapters": 4}


def test_concurrent_requests_for_different_adapters_share_passes(tiny_roberta, files):
    # window 60 s, but a pass closes at 8 rows: the 4 requests of 2 texts make exactly one pass
    server = Live(tiny_roberta, {n: files[n] for n in SERVED}, window=60.0, max_rows=8, max_tokens=100_000)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda n: server.predict(n, TEXTS[:2]), SERVED))
        assert [a.status_code for a in answers] == [200] * 4
        text = server.client.get("/metrics").text
        assert metric(text, "roberta_lite_batches_total") == 1
        assert metric(text, "roberta_lite_batch_rows_sum") == 8
        assert metric(text, "roberta_lite_batch_adapters_sum") == 4
        for name in SERVED:
            assert metric(text, f'roberta_lite_requests_total{{adapter="{name}"}}') == 1
            assert metric(text, f'roberta_lite_texts_total{{adapter="{name}"}}') == 2
        assert metric(text, "roberta_lite_queue_wait_seconds_count") == 4
        assert metric(text, "roberta_lite_request_latency_seconds_count") == 4
        assert 'roberta_lite_request_latency_seconds_bucket{le="+Inf"} 4' in text
    finally:
        server.close()


def test_token_adapter_answers_entities_beside_sentence_adapters(tiny_roberta, files):
    """A tagger's rows run in passes of their own (one pass cannot mix token and sentence heads), in the same round
    as the classifier's; its answers are predict's entities, character offsets into each text."""
    from roberta_lite.predict import Predictor

    server = Live(tiny_roberta, {"sentiment": files["sentiment"], "ner": files["ner"]})
    texts = ["Meryl Streep met Tom Hanks in Paris", "a good film", "", "London " * 200]
    try:
        release = server.hold()
        with ThreadPoolExecutor(2) as pool:
            ner = pool.submit(server.predict, "ner", texts)
            sentiment = pool.submit(server.predict, "sentiment", TEXTS)
            server.wait_queued(len(texts) + len(TEXTS))
            release.set()
            ner, sentiment = ner.result(), sentiment.result()
        assert ner.status_code == 200 and sentiment.status_code == 200, (ner.text, sentiment.text)
        for out, logits in zip(sentiment.json()["outputs"], expected(tiny_roberta, files["sentiment"], TEXTS)):
            check_output(out, logits, "classification", ["neg", "pos"])
        want = Predictor(str(files["ner"]), model=str(tiny_roberta), device="cpu", precision="fp32").classify(texts)
        got = ner.json()["outputs"]
        assert sum(len(w[0]["entities"]) for w in want) > 0  # random weights still find some entities
        for text, out, (w,) in zip(texts, got, want):
            assert [{k: e[k] for k in ("type", "text", "start", "end")} for e in out["entities"]] == \
                [{k: e[k] for k in ("type", "text", "start", "end")} for e in w["entities"]]
            assert all(text[e["start"]:e["end"]] == e["text"] for e in out["entities"])
            assert all(math.isclose(a["score"], b["score"], abs_tol=TOL) for a, b in zip(out["entities"], w["entities"]))
        r = server.predict("ner", [["a pair", "of texts"]])
        assert r.status_code == 400 and "takes single texts, not pairs" in r.json()["error"]
    finally:
        server.close()


def test_batching_off_runs_one_request_per_pass(tiny_roberta, files):
    server = Live(tiny_roberta, {"sentiment": files["sentiment"]}, batching=False)
    try:
        release = server.hold()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(server.predict, "sentiment", TEXTS[:2]) for _ in range(3)]
            server.wait_queued(6)
            release.set()
            assert [f.result().status_code for f in futures] == [200] * 3
        assert metric(server.client.get("/metrics").text, "roberta_lite_batches_total") == 3
    finally:
        server.close()


BAD = {  # name: (body, status, words the error must contain)
    "malformed JSON": (b'{"adapter": "sentiment"', 400, "invalid JSON"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid JSON"),
    "not an object": (b'["sentiment"]', 400, "expected a JSON object"),
    "missing adapter": (b'{"inputs": ["a"]}', 400, "missing field 'adapter'"),
    "missing inputs": (b'{"adapter": "sentiment"}', 400, "missing field 'inputs'"),
    "unknown field": (b'{"adapter": "sentiment", "inputs": ["a"], "top_k": 3}', 400, "unknown field 'top_k'"),
    "adapter not a string": (b'{"adapter": 3, "inputs": ["a"]}', 400, "'adapter' must be a string"),
    "unknown adapter": (b'{"adapter": "nope", "inputs": ["a"]}', 404, "adapter 'nope' is not served"),
    "inputs not a list": (b'{"adapter": "sentiment", "inputs": "a"}', 400, "'inputs' must be a list"),
    "empty inputs": (b'{"adapter": "sentiment", "inputs": []}', 400, "'inputs' is empty"),
    "non-string input": (b'{"adapter": "sentiment", "inputs": ["a", 7]}', 400, "inputs[1]"),
    "null input": (b'{"adapter": "sentiment", "inputs": [null]}', 400, "got null"),
    "pair of three": (b'{"adapter": "nli", "inputs": [["a", "b", "c"]]}', 400, "a list of 3"),
    "pair with a number": (b'{"adapter": "nli", "inputs": [["a", 1]]}', 400, "inputs[0]"),
    "1 MB text": (json.dumps({"adapter": "sentiment", "inputs": ["x" * 1_000_000]}).encode(), 413,
                  "1000000 characters, over the limit of 50000"),
    "100,000 inputs": (json.dumps({"adapter": "sentiment", "inputs": ["a"] * 100_000}).encode(), 413,
                       "100000 items, over the limit of 64"),
    "body over the limit": (b'{"adapter": "sentiment", "inputs": ["' + b"y" * (2 << 20) + b'"]}', 413,
                            "over the limit of 1048576"),
    "not UTF-8": (b'{"adapter": "sentiment", "inputs": ["\xff\xfe"]}', 400, "invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_4xx_and_the_server_lives_on(live, case):
    body, status, words = BAD[case]
    r = live.client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error and "Traceback" not in r.text
    assert live.predict("sentiment", ["a good film"]).status_code == 200


def test_body_over_the_limit_without_content_length_is_refused(live):
    def chunks():  # streamed (chunked transfer encoding): the limit holds without a declared length
        for _ in range(40):
            yield b"z" * 65536
    r = live.client.post("/v1/predict", content=chunks())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_unknown_route_and_method_are_json_errors(live):
    assert live.client.get("/v2/nothing").status_code == 404
    r = live.client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_errors_counted_by_adapter(tiny_roberta, files):
    server = Live(tiny_roberta, {"sentiment": files["sentiment"]})
    try:
        server.predict("sentiment", [])
        server.predict("nope", ["a"])
        server.predict("sentiment", ["a"])
        text = server.client.get("/metrics").text
        assert metric(text, 'roberta_lite_errors_total{adapter="sentiment",code="400"}') == 1
        assert metric(text, 'roberta_lite_errors_total{adapter="-",code="404"}') == 1  # never the unknown name
        assert metric(text, 'roberta_lite_requests_total{adapter="sentiment"}') == 2
    finally:
        server.close()


def test_full_queue_answers_503_with_retry_after(tiny_roberta, files):
    server = Live(tiny_roberta, {"sentiment": files["sentiment"]}, max_queue=3)
    try:
        release = server.hold()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.predict, "sentiment", TEXTS[:2])
            server.wait_queued(2)
            r = server.predict("sentiment", TEXTS[:2])  # 2 + 2 texts > 3
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
            release.set()
            assert first.result().status_code == 200
        assert server.predict("sentiment", TEXTS[:2]).status_code == 200  # room again
    finally:
        server.close()


def admin(live, method, name, token="s3cret", **kw):
    return live.client.request(method, f"/v1/adapters/{name}", headers={"Authorization": f"Bearer {token}"}, **kw)


def test_admin_needs_the_token(live, files, tiny_roberta):
    assert admin(live, "PUT", "x", token="wrong", json={"source": str(files["lo"])}).status_code == 401
    assert live.client.put("/v1/adapters/x", json={"source": str(files["lo"])}).status_code == 401
    assert live.client.delete("/v1/adapters/sentiment").status_code == 401
    server = Live(tiny_roberta, {"sentiment": files["sentiment"]})  # no --admin-token: administration off
    try:
        r = admin(server, "DELETE", "sentiment")
        assert r.status_code == 403 and "--admin-token" in r.json()["error"]
        assert [a["name"] for a in server.client.get("/v1/adapters").json()["adapters"]] == ["sentiment"]
    finally:
        server.close()


def test_bad_adapter_files_are_4xx_and_change_nothing(live, files):
    before = live.client.get("/v1/adapters").json()
    for source, words in ((files["bad"], "adapter_config.json"), (files["other"], "fingerprint"),
                          (files["bad"] / "missing", "not found")):
        r = admin(live, "PUT", "extra", json={"source": str(source)})
        assert r.status_code == 422, r.text
        assert words in r.json()["error"] and "\n" not in r.json()["error"]
    for body in ({"src": "x"}, {"source": 3}, "x"):
        assert admin(live, "PUT", "extra", json=body).status_code == 400
    assert admin(live, "PUT", "bad.name", json={"source": str(files["lo"])}).status_code == 400
    assert admin(live, "DELETE", "nope").status_code == 404
    assert live.client.get("/v1/adapters").json() == before


def test_add_and_remove_while_requests_run(live, files, tiny_roberta):
    want = expected(tiny_roberta, files["sentiment"], TEXTS[:2])
    stop = threading.Event()

    def hammer():
        answers = []
        for _ in range(200):  # bounded
            answers.append(live.predict("sentiment", TEXTS[:2]))
            if stop.is_set():
                break
        return answers

    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(hammer) for _ in range(2)]
        for _ in range(3):
            r = admin(live, "PUT", "lo", json={"source": str(files["lo"])})
            assert r.status_code == 201, r.text
            assert r.json()["kind"] == "lora"
            assert live.predict("lo", TEXTS[:1]).status_code == 200
            assert admin(live, "DELETE", "lo").json() == {"deleted": "lo"}
            assert live.predict("lo", TEXTS[:1]).status_code == 404
        stop.set()
        answers = [a for f in runs for a in f.result()]
    assert answers and all(a.status_code == 200 for a in answers)
    for a in answers:
        for out, logits in zip(a.json()["outputs"], want):
            check_output(out, logits, "classification", ["neg", "pos"])
    assert [a["name"] for a in live.client.get("/v1/adapters").json()["adapters"]] == SERVED


def test_requests_queued_before_a_delete_are_answered(live, files, tiny_roberta):
    assert admin(live, "PUT", "lo", json={"source": str(files["lo"])}).status_code == 201
    assert admin(live, "PUT", "lo", json={"source": str(files["lo"])}).status_code == 200  # replaced
    release = live.hold()
    with ThreadPoolExecutor(2) as pool:
        before = pool.submit(live.predict, "lo", TEXTS[:2])
        live.wait_queued(2)
        deleted = pool.submit(admin, live, "DELETE", "lo")
        for _ in range(400):  # bounded: until the delete is queued behind the request
            if live.service.batcher._queue.qsize() >= 2:
                break
            time.sleep(0.025)
        release.set()
        assert before.result().status_code == 200
        assert deleted.result().status_code == 200
    for out, logits in zip(before.result().json()["outputs"], expected(tiny_roberta, files["lo"], TEXTS[:2])):
        check_output(out, logits, "classification", ["no", "yes"])


def test_merged_lora_equals_unmerged(tiny_roberta, files):
    server = Live(tiny_roberta, {"lo": files["lo"]}, merge="lo", admin_token="s3cret")
    try:
        assert server.client.get("/v1/adapters").json()["adapters"][0]["merged"] is True
        r = server.predict("lo", TEXTS + PAIRS)
        for out, logits in zip(r.json()["outputs"], expected(tiny_roberta, files["lo"], TEXTS + PAIRS)):
            check_output(out, logits, "classification", ["no", "yes"])
        assert admin(server, "PUT", "x", json={"source": str(files["sentiment"])}).status_code == 409
        assert admin(server, "DELETE", "lo").status_code == 409
    finally:
        server.close()


def test_quantize_int8_serves_every_adapter_near_the_float_outputs(tiny_roberta, files):
    """--quantize int8 (after --merge when given): the outputs of the float model's, to int8 precision."""
    server = Live(tiny_roberta, {n: files[n] for n in SERVED}, quantize="int8", admin_token="s3cret")
    try:
        assert server.service.model.quantized == "int8"
        for name in SERVED:
            r = server.predict(name, TEXTS + PAIRS)
            for out, logits in zip(r.json()["outputs"], expected(tiny_roberta, files[name], TEXTS + PAIRS)):
                got = torch.tensor([out["score"]] if "score" in out else list(out["probabilities"].values()))
                want = logits if "score" in out else logits.sigmoid() if "labels" in out else logits.softmax(-1)
                assert (got - want).abs().max() < 0.02, (name, out, want)
        assert admin(server, "PUT", "lo", json={"source": str(files["lo"])}).status_code == 201  # onto int8
    finally:
        server.close()
    merged = Live(tiny_roberta, {"lo": files["lo"]}, merge="lo", quantize="int8")
    try:
        out = merged.predict("lo", TEXTS).json()["outputs"]
        for o, logits in zip(out, expected(tiny_roberta, files["lo"], TEXTS)):
            assert abs(o["probabilities"]["yes"] - float(logits.softmax(-1)[1])) < 0.02
    finally:
        merged.close()


def test_command_line_errors_are_one_line(tiny_roberta, files, capsys):
    base = str(tiny_roberta)
    for argv, words in (([f"--model={base}", "--adapter", "nope"], "--adapter 'nope'"),
                        ([f"--model={base}", "--adapter", "a=/no/such/dir"], "/no/such/dir"),
                        (["--model=/no/such/base", "--adapter", f"a={files['sentiment']}"], "/no/such/base"),
                        ([f"--model={base}", "--adapter", f"a={files['bad']}"], "adapter_config.json"),
                        ([f"--model={base}", "--adapter", f"a={files['sentiment']}", "--merge", "a"], "--merge a"),
                        ([f"--model={base}", "--adapter", f"a={files['sentiment']}", "--port", "99999"], "--port"),
                        ([f"--model={base}", "--adapter", f"a.b={files['sentiment']}"], "'a.b'"),
                        ([f"--model={base}", "--adapter", f"a={files['sentiment']}", "--quantize", "int8",
                          "--precision", "bf16"], "--precision bf16"),
                        ([f"--model={base}"], "--adapter")):
        assert main(argv + ["--port", "0"] if "--port" not in argv else argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_importing_roberta_lite_does_not_import_the_server():
    code = "import sys, roberta_lite, roberta_lite.predict; print('starlette' in sys.modules, 'uvicorn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_sigterm_finishes_requests_in_flight_and_exits_0(tiny_roberta, files):
    # a 60 s window and room for 8 rows: the 3 requests (6 texts) wait in the batcher when SIGTERM comes
    cmd = [sys.executable, "-m", "roberta_lite.serve", "--model", str(tiny_roberta), "--precision", "fp32",
           "--adapter", f"sentiment={files['sentiment']}", "--adapter", f"nli={files['nli']}", "--port", "0",
           "--batch-window-ms", "60000", "--batch-rows", "8"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stderr.readline()  # "serving 2 adapter(s) on http://127.0.0.1:PORT"
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split()[-1]
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as client, ThreadPoolExecutor(3) as pool:
            for _ in range(200):
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            futures = [pool.submit(client.post, "/v1/predict", json={"adapter": a, "inputs": TEXTS[:2]})
                       for a in ("sentiment", "nli", "sentiment")]
            for _ in range(400):  # bounded: until all 6 texts are queued
                if metric(client.get("/metrics").text, "roberta_lite_queue_texts") >= 6:
                    break
                time.sleep(0.025)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 3
        assert all(len(a.json()["outputs"]) == 2 for a in answers)
        assert proc.wait(REQUEST_TIMEOUT) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
