"""Linear fusion for the fast decoder: several linears that read the same input (q/k/v,
gate/up) become one ``FusedLinear`` whose output is split, float or packed alike.
Split out of :mod:`lowbit.runtime.decode`, which re-exports these names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.hardware import fell_back, took_hardware
from lowbit.runtime import native
from lowbit.runtime.packed import PackedLinear

FUSED_PATH = "runtime.fused_linear"  # name in lowbit.hardware.hardware_path_report()
BF16_GEMV_PATH = "runtime.bf16_gemv_native"
_BF16_GEMV: list = []  # [bool] once decided in this process (until native.reset())
native._RESET_HOOKS.append(_BF16_GEMV.clear)


def bf16_gemv() -> bool:
    """Whether bfloat16 decode rows run lowbit's native GEMV (``torch.ops.lowbit.bf16_mm``,
    :func:`lowbit.runtime.native.bf16_gemv_ready`); decided once per process and recorded as
    ``runtime.bf16_gemv_native`` in the hardware path report (a failure warns once)."""
    if not _BF16_GEMV:
        _BF16_GEMV.append(native.choose(BF16_GEMV_PATH, native.bf16_gemv_ready, "torch.mv for "
                                        "bfloat16 decode rows (slower, the same function)"))
    return _BF16_GEMV[0]


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear`` for ``x [T, in]``; a decode row (T = 1) in bfloat16 goes through lowbit's
    native GEMV (:func:`bf16_gemv`) where it builds, else ``torch.mv`` (2-2.6x faster there on
    the CPU than the GEMM path), as does float16 (same fp32 accumulation; float32 is as fast
    either way and keeps ``F.linear``)."""
    if x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
        if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and \
                weight.is_contiguous() and bf16_gemv():
            y = torch.ops.lowbit.bf16_mm(x.contiguous(), weight)
        else:
            y = torch.mv(weight, x[0])[None]
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _plain_linear(mod: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is a plain tensor (not a tensor subclass such as
    torchao's quantized weights, which may not implement ``cat`` or ``mv``)."""
    return type(mod) is nn.Linear and type(mod.weight.data) is torch.Tensor


def _call(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``, with a plain ``nn.Linear`` through :func:`float_linear`."""
    if _plain_linear(mod):
        return float_linear(x, mod.weight, mod.bias)
    return mod(x)


class FusedLinear(nn.Module):
    """``x [T, in] -> [T, sum(out_i)]``: the outputs of several linears sharing one input,
    in order. ``mode`` is how: ``"packed"`` (one concatenated :class:`PackedLinear`),
    ``"float"`` (one concatenated weight), ``"split"`` (each layer called, outputs
    concatenated) or ``"one"`` (a layer that is fused already, Phi-3's ``qkv_proj``)."""

    def __init__(self, mode: str, sizes: list[int], layer: nn.Module | None = None,
                 parts: list[nn.Module] | None = None, weight=None, bias=None):
        super().__init__()
        self.mode, self.sizes = mode, sizes
        self.layer = layer
        self.parts = nn.ModuleList(parts or [])
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode == "packed":
            return self.layer(x)
        if self.mode == "one":
            return _call(self.layer, x)
        if self.mode == "float":
            return float_linear(x, self.weight, self.bias)
        return torch.cat([_call(p, x) for p in self.parts], -1)

    def extra_nbytes(self) -> int:
        """Bytes this fusion holds beyond the model's own weights (copied scales)."""
        if self.mode != "packed":
            return 0
        return sum(b.numel() * b.element_size() for k, b in self.layer._buffers.items()
                   if b is not None and k in self.layer._copied)


def _cat_bias(mods):
    """The concatenated biases (zeros for a layer without one), or None if none has one."""
    bs = [m.bias for m in mods]
    ref = next((b for b in bs if b is not None), None)
    if ref is None:
        return None
    return torch.cat([b.detach() if b is not None else
                      ref.new_zeros(m.out_features) for b, m in zip(bs, mods)])


def _share_rows(mods, name: str, fused: torch.Tensor) -> None:
    """Point each module's buffer/parameter ``name`` at its rows of ``fused`` (a view)."""
    o = 0
    for m in mods:
        n = getattr(m, name).shape[0]
        view = fused[o:o + n]
        old = getattr(m, name)
        if isinstance(old, nn.Parameter):
            setattr(m, name, nn.Parameter(view, requires_grad=old.requires_grad))
        else:
            m._buffers[name] = view
        o += n


def fuse_linears(mods: list[nn.Module], probe: bool = True) -> FusedLinear:
    """One matmul for linears that share an input (q/k/v, gate/up).

    Packed ``int4_weight_only`` layers (same group size, dtypes, every ``out`` a multiple of
    64), ``int8_weight_only`` layers and ``w8a8_int8`` layers (same activation spec; static
    ones with one calibrated amax) concatenate their packed weights along the output;
    plain float ``nn.Linear`` layers their weights. The modules then use row views of the
    fused weight (no second copy; int4 scales stay copies, torch's kernel reads them
    contiguously). Anything else (mixed kernels, fake-quantized layers) is called layer by
    layer. ``probe``: check the fused matmul against the separate ones on a random input;
    on a mismatch the layers are called one by one and a
    :class:`~lowbit.hardware.HardwareFallbackWarning` says so (once per process). The path
    is recorded as ``runtime.fused_linear`` in :func:`lowbit.hardware.hardware_path_report`.
    """
    sizes = [m.out_features for m in mods]
    fused = _try_fuse(mods)
    if fused is not None and probe:
        x = torch.randn(3, mods[0].in_features, generator=torch.Generator().manual_seed(0))
        dt = fused.weight.dtype if fused.mode == "float" else fused.layer.compute_dtype
        dev = (fused.weight if fused.mode == "float" else next(fused.layer.buffers())).device
        x = x.to(dev, dt)
        with torch.no_grad():
            ref = torch.cat([m(x) for m in mods], -1)
            got = fused(x)
            if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max()):
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
                fell_back(FUSED_PATH, RuntimeError(
                    f"the fused {fused.mode} matmul differs from the separate layers by "
                    f"{err:.2e} of the largest output"), "one call per layer")
                fused = None
            else:
                took_hardware(FUSED_PATH)
    if fused is None:
        return FusedLinear("split", sizes, parts=mods)
    return fused


def _try_fuse(mods) -> FusedLinear | None:
    sizes = [m.out_features for m in mods]
    first = mods[0]
    if any(m.in_features != first.in_features for m in mods):
        return None
    if any(m._modules.get("input_rotation") is not None for m in mods):
        return None  # online input rotations: each layer is called with its own
    if all(_plain_linear(m) for m in mods):
        if len({(m.weight.dtype, m.weight.device) for m in mods}) != 1:
            return None
        w = torch.cat([m.weight.detach() for m in mods])
        b = _cat_bias(mods)
        _share_rows(mods, "weight", w)
        return FusedLinear("float", sizes, weight=w, bias=b)
    if not all(isinstance(m, PackedLinear) for m in mods):
        return None
    kern = {m.kernel for m in mods}
    if len(kern) != 1 or len({m.compute_dtype for m in mods}) != 1:
        return None
    kern = kern.pop()
    out = PackedLinear(kern, first.in_features, sum(sizes), None, first.compute_dtype)
    out.bias = None if all(m.bias is None for m in mods) else \
        nn.Parameter(_cat_bias(mods), requires_grad=False)
    if kern == "int4_weight_only":
        if any(n % 64 for n in sizes) or len({(m.group_size, m.act_dtype) for m in mods}) != 1:
            return None
        w = torch.cat([m.w_packed for m in mods])
        out.register_buffer("w_packed", w)
        out.register_buffer("scale_zeros", torch.cat([m.scale_zeros for m in mods], 1))
        out.group_size, out.act_dtype = first.group_size, first.act_dtype
        out.prefill_gemm = all(m.prefill_gemm for m in mods)
        out.gemv_native = all(getattr(m, "gemv_native", False) for m in mods)
        _share_rows(mods, "w_packed", w)
        out._copied = ("scale_zeros",)
    elif kern == "int8_weight_only":
        if len({m.act_dtype for m in mods}) != 1:
            return None
        w = torch.cat([m.w_int8 for m in mods])
        s = torch.cat([m.w_scale for m in mods])
        out.register_buffer("w_int8", w)
        out.register_buffer("w_scale", s)
        out.act_dtype = first.act_dtype
        out.gemv_native = all(getattr(m, "gemv_native", False) for m in mods)
        _share_rows(mods, "w_int8", w)
        _share_rows(mods, "w_scale", s)
        out._copied = ()
    elif kern == "w8a8_int8":
        amax = [m.act_amax for m in mods]
        if any(m.act_spec != first.act_spec for m in mods) or \
                (any(a is not None for a in amax) and
                 not all(a is not None and torch.equal(a, amax[0]) for a in amax)) or \
                len({m.w_ones_bf16 is None for m in mods}) != 1:
            return None  # static inputs fuse only with one calibrated amax for all
        w = torch.cat([m.w_int8 for m in mods])
        out.register_buffer("w_int8", w)
        out.register_buffer("w_scale", torch.cat([m.w_scale for m in mods], 1))
        out.register_buffer("act_amax", amax[0])
        out.register_buffer("w_ones_bf16", None if first.w_ones_bf16 is None else
                            torch.cat([m.w_ones_bf16 for m in mods]))
        out.act_spec = first.act_spec
        _share_rows(mods, "w_int8", w)
        out._copied = ("w_scale", "w_ones_bf16")
    else:
        return None
    out.spec = first.spec
    out.packed_nbytes = sum(m.packed_nbytes for m in mods)
    return FusedLinear("packed", sizes, layer=out)


# --- the decoder ----------------------------------------------------------------------------
