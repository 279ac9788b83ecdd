"""Load figures for the server: a fixed number of requests from concurrent clients, against 127.0.0.1.

    python -m roberta_lite.serve_bench                       # roberta-base shape, 8 adapters, 32 clients
    python -m roberta_lite.serve_bench --shape small --requests 64   # a quick run

Three ways to serve the same 8 adapters (Houlsby, Pfeiffer and LoRA in turn, random weights on a random
roberta-base-shaped base written with transformers' save_pretrained into a temporary directory):
  (a) one server, dynamic mixed batching (the defaults: 5 ms window, 8192-token passes);
  (b) the same server with --no-batching: one request per forward pass;
  (c) eight servers, one adapter each (what serving without shared bases costs in memory).
Each request names a random adapter and carries 1-8 texts: IMDB reviews when the archive is at hand (--texts),
else words drawn at IMDB-like lengths. Reported per mode: requests/s, texts/s, p50/p99 latency, and the servers'
peak RSS (VmHWM; summed over (c)'s eight). The tokenizer is --tokenizer's (roberta-base's files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

from roberta_lite.bench import COMMON
from roberta_lite.adapters import AdapterConfig
from roberta_lite.api import Model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAPES = {  # roberta-base's, and a small one for quick runs; roberta-base's vocabulary in both
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}
KINDS = ["houlsby", "pfeiffer", AdapterConfig("lora", r=8, alpha=16)]
WORDS = ("the film was a good bad great dull story plot acting and it this very quite really not one of "
         "best worst I have seen in years director cast music scene end").split()


def reviews(archive: Path | None, n: int, rng: random.Random) -> list[str]:
    """n texts: the first IMDB test reviews in the archive, else random words at IMDB-like lengths."""
    if archive is not None and archive.is_file():
        out = []
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                if m.isfile() and "/test/" in m.name and m.name.endswith(".txt"):
                    out.append(tar.extractfile(m).read().decode("utf-8", errors="replace"))
                    if len(out) == n:
                        break
        return out
    return [" ".join(rng.choices(WORDS, k=max(8, int(math.exp(rng.gauss(math.log(170), 0.7))))))
            for _ in range(n)]


def build(tmp: Path, shape: str, tokenizer: Path, n: int) -> tuple[Path, dict[str, Path]]:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    base = tmp / "base"
    cfg = {k: v for k, v in COMMON.items() if k not in ("model_type", "architectures")}
    RobertaForSequenceClassification(RobertaConfig(**cfg, **SHAPES[shape], vocab_size=50265)).save_pretrained(base)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        if (tokenizer / f).is_file():
            shutil.copy(tokenizer / f, base / f)
    model = Model.from_pretrained(base)
    dirs = {}
    for i in range(n):
        name = f"a{i}"
        model.add_adapter(name, KINDS[i % len(KINDS)], num_labels=2 + i % 3)
        dirs[name] = tmp / name
        model.save_adapter(dirs[name], name=name)
    return base, dirs


class Server:
    """`python -m roberta_lite.serve` in a subprocess on a free port."""

    def __init__(self, base: Path, adapters: dict[str, Path], precision: str, extra: list[str]):
        cmd = [sys.executable, "-m", "roberta_lite.serve", "--model", str(base), "--port", "0",
               "--precision", precision, "--max-inputs", "8", *extra]
        for name, d in adapters.items():
            cmd += ["--adapter", f"{name}={d}"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stderr.readline()
        if "http://" not in line:
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split()[-1]
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def rss(self, field: str = "VmHWM") -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self):
        self.proc.terminate()
        self.proc.wait(120)


def load(urls: dict[str, str], texts: list[str], requests: int, clients: int, seed: int) -> dict:
    """`requests` requests from `clients` threads; urls: adapter -> server url."""
    rng = random.Random(seed)
    plan = [(a, rng.sample(texts, rng.randint(1, 8))) for a in rng.choices(sorted(urls), k=requests)]
    lock, latencies, failures = threading.Lock(), [], []

    def client():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if not plan:
                        return
                    adapter, inputs = plan.pop()
                t = time.perf_counter()
                r = c.post(urls[adapter] + "/v1/predict", json={"adapter": adapter, "inputs": inputs})
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        failures.append(r.text)
    n_texts = sum(len(x) for _, x in plan)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    latencies.sort()
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))]  # noqa: E731
    return {"requests_per_s": requests / wall, "texts_per_s": n_texts / wall, "p50_s": q(0.5), "p99_s": q(0.99),
            "wall_s": wall}


def warm(urls: dict[str, str], texts: list[str]):
    with httpx.Client(timeout=600) as c:
        for adapter, url in urls.items():
            c.post(url + "/v1/predict", json={"adapter": adapter, "inputs": texts[:8]}).raise_for_status()


def mode(name: str, servers: list[Server], urls: dict[str, str], texts: list[str], a) -> dict:
    warm(urls, texts)
    row = load(urls, texts, a.requests, a.clients, a.seed)
    row.update(mode=name, peak_rss_bytes=sum(s.rss() for s in servers),
               peak_rss_per_server_bytes=max(s.rss() for s in servers))
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m roberta_lite.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="base", help="random base's shape")
    p.add_argument("--requests", type=int, default=64, help="requests per mode")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "roberta-base",
                   help="a directory with roberta-base's tokenizer.json (default ../shared/roberta-base)")
    p.add_argument("--texts", type=Path, default=SHARED / "data" / "aclImdb-labelled.tar.gz",
                   help="an aclImdb archive to take reviews from (else random words at IMDB-like lengths)")
    p.add_argument("--modes", default="a,b,c", help="which of a, b, c to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    if not (a.tokenizer / "tokenizer.json").is_file():
        p.error(f"--tokenizer {a.tokenizer}: no tokenizer.json there")
    texts = reviews(a.texts, 400, random.Random(a.seed))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, dirs = build(Path(tmp), a.shape, a.tokenizer, a.adapters)
        if "a" in a.modes or "b" in a.modes:
            for name, extra in (("a", []), ("b", ["--no-batching"])):
                if name not in a.modes:
                    continue
                server = Server(base, dirs, a.precision, extra)
                try:
                    rows.append(mode(name, [server], {n: server.url for n in dirs}, texts, a))
                finally:
                    server.close()
        if "c" in a.modes:
            servers = []
            try:
                for n, d in dirs.items():
                    servers.append(Server(base, {n: d}, a.precision, []))
                rows.append(mode("c", servers, {n: s.url for n, s in zip(dirs, servers)}, texts, a))
            finally:
                for s in servers:
                    s.close()
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
