"""Training checkpoints for train.py: adapter + head weights, AdamW moments, the best epoch's weights and the run's
state, as safetensors + JSON (never pickled), written so that a kill at any moment leaves one complete checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from roberta_lite.weights import CheckpointError

FORMAT = "roberta_lite.train-checkpoint/1"


# ------------------------------------------------------------------------- checkpoints (never pickled)
#
# OUTPUT/checkpoint/ holds trainable.safetensors (adapters + head), optimizer.safetensors (AdamW moments by
# parameter name), best.safetensors (the best epoch's weights so far) and state.json (step, data position,
# learning-rate schedule, RNG states, history, configuration, and the sha256 of each tensor file).
# It is written as checkpoint.tmp-PID/, then swapped in by two renames: checkpoint -> checkpoint.old-PID,
# checkpoint.tmp-PID -> checkpoint, and only then is the old one deleted. A kill -9 at any moment therefore
# leaves a complete checkpoint/ or (between the renames) a complete checkpoint.old-PID/, which load_checkpoint
# falls back to; every file is verified against its recorded hash before use.

def _fsync_dir(path: Path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    from safetensors.torch import save

    final = output / "checkpoint"
    if final.is_dir():  # leftovers of a killed run are stale only while a complete checkpoint/ exists
        for stale in list(output.glob("checkpoint.tmp-*")) + list(output.glob("checkpoint.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = output / f"checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = dict(state, format=FORMAT, files={})
    for name, tdict in tensors.items():
        blob = save({k: v.detach().to("cpu").contiguous() for k, v in tdict.items()})
        _write_file(tmp / f"{name}.safetensors", blob)
        state["files"][f"{name}.safetensors"] = hashlib.sha256(blob).hexdigest()
    _write_file(tmp / "state.json", (json.dumps(state, indent=1) + "\n").encode())
    _fsync_dir(tmp)
    if final.is_dir():
        old = output / f"checkpoint.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        _fsync_dir(output)
    return final


def _read_checkpoint_dir(d: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    from safetensors.torch import load

    try:
        state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / 'state.json'}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{d / 'state.json'}: not a {FORMAT} checkpoint")
    tensors = {}
    for fname, digest in state.get("files", {}).items():
        try:
            blob = (d / fname).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{d / fname}: unreadable ({e.strerror or e})") from None
        if hashlib.sha256(blob).hexdigest() != digest:
            raise CheckpointError(f"{d / fname}: contents do not match the checksum in state.json")
        tensors[fname.removesuffix(".safetensors")] = load(blob)
    return state, tensors


def load_checkpoint(output: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], Path]:
    """The newest complete checkpoint in `output`: checkpoint/, else one left mid-swap by a kill."""
    candidates = [output / "checkpoint"] + sorted(output.glob("checkpoint.old-*"))
    errors = []
    found = []
    for d in candidates:
        if not d.is_dir():
            continue
        try:
            state, tensors = _read_checkpoint_dir(d)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        found.append((state.get("step", -1), d == candidates[0], state, tensors, d))
    if not found:
        why = f" ({errors[0]})" if errors else ""
        raise CheckpointError(f"--resume: no loadable checkpoint in {output}{why}; expected {output / 'checkpoint'}/ "
                              f"written by --save-every, at an epoch's end, or on Ctrl-C")
    _, _, state, tensors, d = max(found, key=lambda f: (f[0], f[1]))
    return state, tensors, d


def rng_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def rng_from_b64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """AdamW state as {name.exp_avg: tensor, ...} plus JSON-able per-parameter step counts."""
    tensors, steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            tensors[f"{name}.exp_avg"] = st["exp_avg"]
            tensors[f"{name}.exp_avg_sq"] = st["exp_avg_sq"]
            steps[name] = float(st["step"])
    return tensors, steps


def restore_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict, steps: dict, where: Path):
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in steps:
                continue
            try:
                m, v = tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"]
            except KeyError:
                raise CheckpointError(f"{where}: optimizer state of {name!r} is incomplete") from None
            if m.shape != p.shape:
                raise CheckpointError(f"{where}: optimizer state of {name!r} has shape {tuple(m.shape)}, "
                                      f"the parameter {tuple(p.shape)}")
            # AdamW keeps its step count on the parameter's device when fused or capturable (CUDA's fused kernel
            # refuses a CPU one: "Expected all tensors to be on the same device ... state_steps"), else on the CPU.
            on = p.device if group.get("fused") or group.get("capturable") else "cpu"
            opt.state[p] = {"step": torch.tensor(steps[name], dtype=torch.float32, device=on),
                            "exp_avg": m.to(p.device, p.dtype).clone(), "exp_avg_sq": v.to(p.device, p.dtype).clone()}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{where}: adapter/head tensors do not match this model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise CheckpointError(f"{where}: {n!r} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[n])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors' exact values (to compare weights across processes)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
