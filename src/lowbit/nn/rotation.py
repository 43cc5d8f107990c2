"""Online rotations: an orthogonal matrix applied to an activation inside the model.

Rotations (QuaRot, SpinQuant, MR-GPTQ) are folded into the weights where something can absorb
them; where nothing can, they are applied *online*, by an :class:`OnlineRotation` held by the
module at one of three fixed places (attribute names are part of the checkpoint format):

* ``<linear>.input_rotation`` on a lowbit quantized linear (:class:`~lowbit.nn.QuantLinear`,
  GPT-2's ``QuantConv1D``, the runtime's ``PackedLinear``): the input is rotated **before**
  the input quantizer, ``y = Qo(Qi(x R) @ Qw(W R).T + b)``; the weight was rotated offline;
* ``<attention>.qk_rotation``: queries and keys are rotated after RoPE, before the KV-cache
  quantizers, in the wrapper of transformers' shared attention functions
  (:mod:`lowbit.nn.kv_cache`); ``q . k`` is unchanged;
* ``<norm>.output_rotation``: the norm's output is rotated by a forward hook (a norm whose
  per-channel weight cannot be folded, e.g. Gemma's sandwich post-norms).

The matrix is a persistent float32 buffer (``<owner>.<attr>.matrix`` in the state dict; casts
of the model leave it float32). A module without a rotation has no attribute and pays
nothing. :func:`online_rotations` lists them for exporters; :func:`attach_rotation` puts
one in place (also what :func:`lowbit.load` does to re-create them before loading weights).
The numerics are :func:`lowbit.core.rotation.rotate_last`'s.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lowbit.errors import ConfigError

KINDS = ("hadamard", "random_hadamard", "random", "matrix")
#: ``where`` -> the attribute of the owning module
ATTRS = {"input": "input_rotation", "qk": "qk_rotation", "norm_output": "output_rotation"}


class OnlineRotation(nn.Module):
    """``x [..., size] -> x @ R``: ``R`` is ``matrix`` ``[size, size]``, or block-diagonal
    with ``size // block`` copies of ``matrix`` ``[block, block]``.

    ``kind``: how the matrix was made (``hadamard``, ``random_hadamard``, ``random``, or
    ``matrix`` for a learned/explicit one); ``seed``, ``block``: as recorded for the spec.
    """

    def __init__(self, matrix: torch.Tensor, kind: str, size: int, seed: int | None = None,
                 block: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"online rotation kind {kind!r}: expected one of "
                              f"{', '.join(KINDS)}")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"online rotation size {size!r}: expected a positive int")
        if block is not None and (not isinstance(block, int) or block < 1 or size % block):
            raise ConfigError(f"online rotation block {block!r}: expected a positive int "
                              f"dividing the size {size}")
        b = size if block is None else block
        if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (b, b):
            got = list(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix)
            raise ConfigError(f"online rotation matrix: expected shape [{b}, {b}] (size "
                              f"{size}, block {block}); got {got}")
        self.kind, self.size, self.seed, self.block = kind, size, seed, block
        self.register_buffer("matrix", matrix.detach().to(torch.float32).contiguous())

    @classmethod
    def placeholder(cls, spec: dict, where: str = "") -> "OnlineRotation":
        """An empty (zero) rotation of the shape ``spec`` (:meth:`spec`) describes, for a
        checkpoint's state dict to fill; a malformed spec is a ConfigError naming ``where``."""
        try:
            size, block = spec["size"], spec.get("block")
            b = size if block is None else block
            return cls(torch.zeros(b, b), spec["kind"], size, spec.get("seed"), block)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: online rotation spec {spec!r} lacks or mistypes "
                              f"{e}; expected kind, size, seed, block") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., size]`` rotated, in ``x``'s dtype."""
        if x.shape[-1] != self.size:
            raise ConfigError(f"online rotation of width {self.size} applied to an input of "
                              f"shape {list(x.shape)}")
        from lowbit.core.rotation import rotate_last  # the numerics live in lowbit.core

        return rotate_last(x, self.matrix)

    def spec(self) -> dict:
        """``{kind, size, seed, block}``: what recreates this rotation's shape."""
        return {"kind": self.kind, "size": self.size, "seed": self.seed, "block": self.block}

    def _apply(self, fn, recurse=True):
        # model.half()/.to(bfloat16) must not round the matrix: only device moves apply
        before = self._buffers.get("matrix")
        super()._apply(fn, recurse)
        now = self._buffers.get("matrix")
        if before is not None and now is not None and now.dtype != before.dtype:
            self._buffers["matrix"] = before.to(now.device)
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())


def _rotate_norm_output(mod: nn.Module, args, out):
    """Forward hook of a norm with an ``output_rotation``: its output, rotated."""
    r = mod._modules.get("output_rotation")
    return out if r is None else r(out)


def _width(m: nn.Module) -> int | None:
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return w.numel()
    shape = getattr(m, "normalized_shape", None)
    return shape[-1] if shape else None


def attach_rotation(model: nn.Module, module_name: str, where: str,
                    rot: OnlineRotation) -> None:
    """Give module ``module_name`` of ``model`` the online rotation ``rot`` at ``where``:
    ``"input"`` (a lowbit quantized linear's ``input_rotation``, width ``in_features``),
    ``"qk"`` (an attention module's ``qk_rotation``, width ``head_dim``; installs the
    attention wrapper) or ``"norm_output"`` (a norm's ``output_rotation`` + forward hook).
    A rotation already there is replaced. A module that cannot hold it is a ConfigError
    naming it and why."""
    if where not in ATTRS:
        raise ConfigError(f"attach_rotation: where {where!r}; expected one of "
                          f"{', '.join(ATTRS)}")
    if not isinstance(rot, OnlineRotation):
        raise ConfigError(f"attach_rotation: rot must be an OnlineRotation; got "
                          f"{type(rot).__name__}")
    try:
        m = model.get_submodule(module_name)
    except AttributeError:
        raise ConfigError(f"attach_rotation: no module {module_name!r} in the model") from None
    label = f"module {module_name!r} ({type(m).__name__})"
    if where == "input":
        if not getattr(m, "accepts_input_rotation", False):
            raise ConfigError(f"{label} cannot hold an input rotation: only lowbit's quantized "
                              f"linears (QuantLinear, GPT-2 QuantConv1D, PackedLinear) apply "
                              f"one before their input quantizer (quantize the layer first)")
        n = m.in_features if hasattr(m, "in_features") else m.weight_2d().shape[1]
        if n != rot.size:
            raise ConfigError(f"{label}: input rotation of width {rot.size}, the layer reads "
                              f"{n} inputs")
    elif where == "qk":
        from lowbit.nn.kv_cache import install_qk_hooks

        hd = getattr(m, "head_dim", None)
        if isinstance(hd, int) and hd != rot.size:
            raise ConfigError(f"{label}: q/k rotation of width {rot.size}, the heads are "
                              f"{hd} wide")
        install_qk_hooks(model, m, module_name)
    else:
        from lowbit.adapters import is_norm

        if not is_norm(m):
            raise ConfigError(f"{label} is not a norm (LayerNorm or RMSNorm-like with a "
                              f"per-channel weight): cannot hold an output rotation")
        if _width(m) != rot.size:
            raise ConfigError(f"{label}: output rotation of width {rot.size}, the norm "
                              f"is {_width(m)} wide")
    setattr(m, ATTRS[where], rot)
    if where == "norm_output" and not any(h is _rotate_norm_output
                                          for h in m._forward_hooks.values()):
        m.register_forward_hook(_rotate_norm_output)


def online_rotations(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"where": ..., "kind", "size", "seed", "block"}}`` for every online
    rotation of ``model`` (a module holding more than one appears once per place, the later
    under ``"<name>#<where>"``; none does in practice)."""
    out: dict[str, dict] = {}
    for name, m in model.named_modules():
        mods = m._modules
        for where, attr in ATTRS.items():
            r = mods.get(attr)
            if isinstance(r, OnlineRotation):
                key = name if name not in out else f"{name}#{where}"
                out[key] = {"where": where, **r.spec()}
    return out


@contextlib.contextmanager
def suspended(m: nn.Module, where: str):
    """Run ``m`` without its online rotation at ``where`` inside the ``with`` block (e.g. to
    measure what a norm itself computes); restored after, in place."""
    attr = ATTRS[where]
    r = m._modules.get(attr)
    if r is None:
        yield m
        return
    m._modules[attr] = None
    try:
        yield m
    finally:
        m._modules[attr] = r


def rotation_of(m: nn.Module, where: str) -> OnlineRotation | None:
    """The online rotation module ``m`` holds at ``where`` (see :data:`ATTRS`), or None."""
    return m._modules.get(ATTRS[where])


__all__ = ["ATTRS", "KINDS", "OnlineRotation", "attach_rotation", "online_rotations",
           "rotation_of", "suspended"]
