"""An int8 frozen base for CPU inference: `model.quantize("int8")` (api.Model.quantize calls `quantize` here).

The frozen base's matmul weights — every layer's attn.qkv, attn.proj, ffn.up, ffn.down, and mlm.dense — become
int8, one symmetric scale per output channel; activations are quantized on the fly ("dynamic" quantization), in
effect per token; the output is float32 again. Embeddings, LayerNorms, adapters, LoRAs and heads are untouched, so
every adapter kind, task head and mixed batch runs on it as on the float base. model.py is unchanged:
`Int8Linear` takes each base nn.Linear's place, as precision.py swaps classes.

The kernel is PyTorch's own dynamic quantized linear (`torch.ops.quantized.linear_dynamic`, weights packed once by
`linear_prepack` for the oneDNN engine), chosen by measurement on a 2-core AMD EPYC (AVX512-VNNI/BF16): the four
linears of a roberta-base layer at 2,048 tokens, 1 thread, took fp32 303 ms, bf16 146 ms, this kernel 72 ms
(fbgemm engine 81 ms; torchao 0.18's Int8DynamicActivationInt8WeightConfig 142 ms eager, 99 ms under
torch.compile; torch._int_mm with per-token scales written out ~125 ms). torch 2.13 marks the quantized-tensor
constructors deprecated (a UserWarning, silenced around the one call that needs them) and
torch.ao.quantization.quantize_dynamic deprecated (not used); the ops themselves warn nothing.

Per token: the kernel quantizes its whole input with one scale, and a few tokens with large activations (MiniLM's
reach 27 where the median token's largest is 5) then cost everyone else their resolution: on real IMDB reviews the
MiniLM classifier's logits moved 10.8% (relative) from float32. So each token is divided by its own largest |value|
first and its output row multiplied back, which makes the one scale a per-token one: 3.3%, for 88 ms instead of
72 at the shapes above (error on Gaussian inputs with outlier tokens: 0.9% against 5%).

Inference only. Refused with a RuntimeError: a forward pass in training mode, a backward pass through an int8
layer, freeze_base, merging or unmerging a LoRA (merge first, then quantize), reading or saving the
base weights (state_dict), quantizing twice or another scheme. The base fingerprints (weights.fingerprint, versions
1 and 2) are computed from the float weights before they go, so adapter files move freely between the float and
the int8 base.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from roberta_lite import adapters as A

SCHEMES = ("int8",)
BASE_LINEARS = ("attn.qkv", "attn.proj", "ffn.up", "ffn.down")  # in every layer; and mlm.dense
ENGINE = "onednn"  # 72 ms against fbgemm's 81 (module docstring); the packed weights remember their engine
CHUNK = 1024  # tokens per kernel call: at 32 x 256, roberta-base, 1 thread, 7.7 s per pass instead of 9.2 (512: 7.8)


def vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AMX): there the kernel may use the full
    uint8 range for activations; without them (AVX2's vpmaddubsw) pairs of products can saturate int16, so the
    activations use 7 bits, as torch's own default for x86 does."""
    cpu = getattr(torch._C, "_cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_vnni_supported", "_is_amx_tile_supported"))


class _NoBackward(torch.autograd.Function):
    """Passes an int8 layer's output on; a backward pass through it is an error, so a forward pass whose input
    carries gradients (a trainable adapter or base part before the layer) still runs, for inference."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        ctx.name = name
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(f"{ctx.name} is int8: gradients cannot flow back through the quantized base (inference "
                           f"only); train on the float base and load the adapter onto this one")


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W int8 per output channel and each token of x quantized on the fly; float32 in (the
    kernel reads nothing else) and float32 out, so attention and GELU after it run in float32 whatever dtype the
    base was loaded in. (Returning bf16 from qkv and up in a bf16-loaded base, for bf16 attention and GELU, was
    measured no faster — the casts cost what bf16 saves: 2,030 against 1,807 ms CPU time at 8 x 256, 1 thread —
    and its error was larger, so int8 is quantized from, and run beside, a float32 base.)"""

    def __init__(self, linear: nn.Linear, name: str):
        super().__init__()
        self.name, self.in_features, self.out_features = name, linear.in_features, linear.out_features
        w = linear.weight.detach().float().cpu()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()  # (out,): symmetric, zero point 0
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().cpu().clone(),
                             persistent=False)
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = ENGINE
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
                q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, None)
        finally:
            torch.backends.quantized.engine = previous
        self.reduce_range = not vnni()
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError(f"{self.name} is int8: the quantized base runs inference only; call model.eval(), "
                               f"or train on the float base and load the adapter onto this one")
        v = x.detach().float().reshape(-1, self.in_features)
        if v.shape[0] <= CHUNK:
            y = self.rows(v)
        else:  # in chunks: each chunk's temporaries stay in cache between the passes over them
            y = torch.empty(v.shape[0], self.out_features)
            for i in range(0, v.shape[0], CHUNK):
                y[i:i + CHUNK] = self.rows(v[i:i + CHUNK])
        y = y.view(*x.shape[:-1], self.out_features)
        return _NoBackward.apply(x, y, self.name) if x.requires_grad and torch.is_grad_enabled() else y

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """(N, in) float32 -> (N, out): each row scaled to a largest |value| of 1, so the kernel's one scale for
        the whole input is, in effect, one per row; the output rows scaled back."""
        t = torch.maximum(v.amax(dim=-1, keepdim=True), -v.amin(dim=-1, keepdim=True)).clamp_min(1e-30)  # max |v|
        y = torch.ops.quantized.linear_dynamic((v / t).contiguous(), self._packed, self.reduce_range)
        return y * t if self.bias is None else torch.addcmul(self.bias, y, t)  # b + t · W (v / t)

    @property
    def weight(self):
        raise RuntimeError(f"{self.name} is int8: its float weight is gone (merge a LoRA before quantize('int8'); "
                           f"load the float checkpoint to read or change base weights)")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"{prefix}: saving the int8 base is refused (it is derived from the float checkpoint, "
                           f"which stays the one to publish); save adapters with save_adapter()")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel, {ENGINE}"


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantized", None) is not None


def base_linears(model: nn.Module):
    """(name, parent module, attribute) of every frozen-base matmul quantize replaces."""
    for i, layer in enumerate(model.layers):
        for path in BASE_LINEARS:
            parent, attr = path.split(".")
            yield f"layers.{i}.{path}", getattr(layer, parent), attr
    if getattr(model, "mlm", None) is not None:
        yield "mlm.dense", model.mlm, "dense"


def check_scheme(scheme) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme {scheme!r} is not supported (supported: {', '.join(SCHEMES)})")


def quantize(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Make `model`'s frozen base int8 in place (see the module docstring); returns it in eval mode."""
    check_scheme(scheme)
    if is_quantized(model):
        raise RuntimeError(f"quantize: this model's base is already {model.quantized}; quantize a float model once")
    if model.embed.tok.weight.device.type != "cpu":
        raise RuntimeError(f"quantize: int8 is a CPU path; the model is on {model.embed.tok.weight.device} "
                           f"(use bf16 on a GPU)")
    for version in (1, 2):  # of the float weights, before they go: adapter files keep naming this base
        model.base_fingerprint(version)
    swaps = []  # all made before any is swapped in: a failure leaves the model as it was
    for name, parent, attr in base_linears(model):
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"quantize: {name} is a {type(linear).__name__}, not a Linear")
        swaps.append((parent, attr, Int8Linear(linear, name)))
    for parent, attr, int8 in swaps:
        setattr(parent, attr, int8)
    base = A.is_base(model)
    for name, p in model.named_parameters():  # embeddings and LayerNorms: frozen with the rest of the base
        if base[name]:
            p.requires_grad_(False)
    model.quantized = scheme
    return model.eval()


def refuse(model: nn.Module, what: str) -> None:
    """A clear error for what an int8 base cannot do (`what`: the method called)."""
    if is_quantized(model):
        raise RuntimeError(f"{what}: the base is {model.quantized} (inference only); do it on the float base — "
                           f"train, merge or unmerge there, then quantize")
