"""Granularity as a view: where the scales of a tensor live and how they broadcast.

``Layout(spec, shape)`` turns a tensor ``x`` of ``shape`` into a *view* ``xv`` in which one
scale unit is reduced over ``reduce_dims`` (so ``amax = xv.abs().amax(reduce_dims,
keepdim=True)`` has one value per scale unit and broadcasts against ``xv``), and back.

Stored ("natural") scale shapes, the layout compressed-tensors also uses:

=========== ========================== =================================
granularity x of shape [O, I]          general
=========== ========================== =================================
tensor      ``[]``                     ``[]``
channel     ``[O, 1]`` (axis 0)        size of ``axis`` kept, 1 elsewhere
token       ``[O, 1]``                 ``shape[:-1] + [1]``
group       ``[O, I / g]`` (axis -1)   ``axis`` divided by ``g``
block       ``[ceil(O/r), ceil(I/c)]`` last two dims divided (rounded up)
=========== ========================== =================================
"""

from __future__ import annotations

import math

import torch

from lowbit.core.spec import QuantSpec
from lowbit.errors import ConfigError


class Layout:
    """Views of a tensor of ``shape`` per the granularity of ``spec``."""

    def __init__(self, spec: QuantSpec, shape: torch.Size | tuple[int, ...]):
        self.spec = spec
        self.shape = tuple(shape)
        nd = len(self.shape)
        g = spec.granularity
        self.pad = (0, 0)
        if g in ("channel", "group"):
            if nd == 0:
                raise ConfigError(f"granularity {g!r} needs a tensor with dimensions")
            axis = spec.axis
            if not -nd <= axis < nd:
                raise ConfigError(f"axis {axis} is out of range for a tensor of shape "
                                  f"{list(self.shape)}")
            self.axis = axis % nd
        if g == "group":
            n, gs = self.shape[self.axis], spec.group_size
            if n % gs:
                raise ConfigError(
                    f"group size {gs} does not divide dimension {self.axis} of size {n} "
                    f"(shape {list(self.shape)}); choose a group size that divides it"
                )
        if g == "block":
            if nd < 2:
                raise ConfigError("granularity 'block' needs a tensor with 2 or more dimensions")
            r, c = spec.block
            m, n = self.shape[-2:]
            self.pad = ((-m) % r, (-n) % c)
        if g == "token" and nd == 0:
            raise ConfigError("granularity 'token' needs a tensor with dimensions")

    # --- forward ---------------------------------------------------------------------------
    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the view in which scale units reduce over :attr:`reduce_dims`."""
        g = self.spec.granularity
        if g == "group":
            x = x.movedim(self.axis, -1)
            return x.reshape(*x.shape[:-1], x.shape[-1] // self.spec.group_size,
                             self.spec.group_size)
        if g == "block":
            r, c = self.spec.block
            if any(self.pad):
                x = torch.nn.functional.pad(x, (0, self.pad[1], 0, self.pad[0]))
            *lead, m, n = x.shape
            return x.reshape(*lead, m // r, r, n // c, c)
        return x

    @property
    def reduce_dims(self) -> tuple[int, ...] | None:
        """Dims of the view reduced per scale unit (None: all of them)."""
        g = self.spec.granularity
        nd = len(self.shape)
        if g == "tensor":
            return None
        if g == "channel":
            return tuple(d for d in range(nd) if d != self.axis)
        if g == "token":
            return (nd - 1,)
        if g == "group":
            return (nd,)  # the view has one more dim; groups are its last
        return (nd - 1, nd + 1)  # block: [..., M/r, r, N/c, c]

    def unview(self, yv: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`view` (crops the padding of partial blocks)."""
        g = self.spec.granularity
        if g == "group":
            y = yv.reshape(*yv.shape[:-2], yv.shape[-2] * yv.shape[-1])
            return y.movedim(-1, self.axis)
        if g == "block":
            *lead, mr, r, nc, c = yv.shape
            y = yv.reshape(*lead, mr * r, nc * c)
            if any(self.pad):
                y = y[..., : self.shape[-2], : self.shape[-1]]
            return y
        return yv

    # --- scales --------------------------------------------------------------------------
    def reduce_amax(self, xv: torch.Tensor, signed_min: bool = False) -> torch.Tensor:
        """max |x| (or min x when ``signed_min``; max x is ``reduce_max``) per scale unit."""
        dims = self.reduce_dims
        if signed_min:
            return xv.amin(dim=dims, keepdim=True) if dims else xv.amin().reshape([1] * xv.ndim)
        a = xv.abs()
        return a.amax(dim=dims, keepdim=True) if dims else a.amax().reshape([1] * xv.ndim)

    def reduce_max(self, xv: torch.Tensor) -> torch.Tensor:
        """max x per scale unit (keepdim, view layout)."""
        dims = self.reduce_dims
        return xv.amax(dim=dims, keepdim=True) if dims else xv.amax().reshape([1] * xv.ndim)

    def to_natural(self, sv: torch.Tensor) -> torch.Tensor:
        """Scale in view layout (keepdim) -> stored layout (see module doc)."""
        g = self.spec.granularity
        if g == "tensor":
            return sv.reshape(())
        if g in ("channel", "token"):
            return sv
        if g == "group":
            return sv.squeeze(-1).movedim(-1, self.axis)
        return sv.squeeze(-1).squeeze(-2)  # block

    def from_natural(self, s: torch.Tensor) -> torch.Tensor:
        """Stored scale (or amax) -> view layout that broadcasts against :meth:`view`."""
        s = torch.as_tensor(s, dtype=torch.float32)
        g = self.spec.granularity
        nd = len(self.shape)
        if g == "tensor":
            return s.reshape([1] * nd)
        if g in ("channel", "token"):
            if g == "channel" and s.ndim == 1:  # a flat per-channel vector is accepted too
                shape = [1] * nd
                shape[self.axis] = s.numel()
                return s.reshape(shape)
            return s
        if g == "group":
            return s.movedim(self.axis, -1).unsqueeze(-1)
        return s.unsqueeze(-1).unsqueeze(-3)  # block

    def natural_shape(self) -> tuple[int, ...]:
        """Shape of the stored scale for this tensor."""
        g = self.spec.granularity
        s = list(self.shape)
        if g == "tensor":
            return ()
        if g == "channel":
            return tuple(n if d == self.axis else 1 for d, n in enumerate(s))
        if g == "token":
            return tuple(s[:-1] + [1])
        if g == "group":
            s[self.axis] //= self.spec.group_size
            return tuple(s)
        r, c = self.spec.block
        return tuple(s[:-2] + [math.ceil(s[-2] / r), math.ceil(s[-1] / c)])
