"""Orthogonal rotations for quantization (QuaRot, SpinQuant, MR-GPTQ): numerics only.

Hadamard matrices are built, never copied from a table:

- powers of two: Sylvester's doubling ``H_2n = [[H, H], [H, -H]]`` from ``H_1 = [1]``
  (the same matrix as compressed-tensors' ``deterministic_hadamard_matrix``, normalised);
- Paley I: order ``q + 1`` for a prime ``q = 3 (mod 4)`` (4, 8, 12, 20, 24, 32, 44, 48, 60...);
- Paley II: order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (12, 28, 36, 60, 76, 108...);
- Kronecker products: ``n = 2^a * m`` is ``kron(H_{2^a}, H_m)`` (Sylvester doubling of the
  Paley matrix ``H_m``), with ``m`` the smallest Paley order that makes ``n / m`` a power
  of two; failing that, ``m = m1 * m2`` with two Paley orders.

Every matrix here is orthonormal (entries ``+-1/sqrt(n)`` for a Hadamard matrix) and a
deterministic function of its arguments; seeded kinds draw from a private
``torch.Generator`` and never touch the global RNG.

>>> import torch
>>> from lowbit.core.rotation import hadamard_matrix, is_orthogonal, rotate_last
>>> h = hadamard_matrix(576)          # 36 * 16: Paley II (q = 17) doubled four times
>>> is_orthogonal(h)
True
>>> x = torch.randn(2, 64)
>>> r = hadamard_matrix(16)
>>> torch.allclose(rotate_last(x, r), x @ torch.block_diag(*[r.float()] * 4), atol=1e-6)
True
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import ConfigError

ROTATION_KINDS = ("hadamard", "random_hadamard", "random")

__all__ = [
    "ROTATION_KINDS", "cayley", "hadamard_matrix", "is_hadamard_size", "is_orthogonal",
    "rotate_last", "rotation_matrix",
]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(m: int) -> str | None:
    """'I' or 'II' when a Paley construction gives a Hadamard matrix of order ``m``."""
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I"
    if m >= 12 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II"
    return None


@functools.lru_cache(maxsize=256)
def _plan(n: int) -> tuple[int, tuple[int, ...]] | None:
    """``(2^a, (m, ...))`` with ``n = 2^a * prod(m)``, each ``m`` a Paley order; None if none."""
    if n < 1:
        return None
    if _is_pow2(n):
        return (n, ())
    odd = n
    while odd % 2 == 0:
        odd //= 2
    # one Paley order: the smallest m = odd * 2^b (m divides n) that is a Paley order
    m = odd
    while n % m == 0:
        if _paley_kind(m) is not None:
            return (n // m, (m,))
        m *= 2
    # two Paley orders: the smallest m1 (m1 <= sqrt(n)), then the smallest m2 = odd * 2^b
    for m1 in range(12, math.isqrt(n) + 1, 4):
        if n % m1 or _is_pow2(m1) or _paley_kind(m1) is None:
            continue
        rest = n // m1
        m2 = rest
        while m2 % 2 == 0:
            m2 //= 2
        while rest % m2 == 0:
            if not _is_pow2(m2) and _paley_kind(m2) is not None:
                return (rest // m2, (m1, m2))
            m2 *= 2
    return None


def is_hadamard_size(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build an ``[n, n]`` Hadamard matrix (int ``n``)."""
    return isinstance(n, int) and not isinstance(n, bool) and _plan(n) is not None


def _neighbours(n: int) -> tuple[int, int | None]:
    lo = next((k for k in range(max(n, 1), 0, -1) if _plan(k) is not None), 1)
    hi = next((k for k in range(max(n, 1), max(n, 1) * 2 + 8) if _plan(k) is not None), None)
    return lo, hi


def _quadratic_character(q: int) -> torch.Tensor:
    """``chi[k]`` for k in 0..q-1: 0 at 0, +1 for a nonzero square mod q, -1 otherwise."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    squares = torch.unique(torch.arange(1, q, dtype=torch.int64) ** 2 % q)
    chi[squares] = 1.0
    chi[0] = 0.0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[i, j] = chi(j - i mod q)`` [q, q] float64."""
    idx = torch.arange(q, dtype=torch.int64)
    return _quadratic_character(q)[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor:
    """Unnormalised (+-1) Hadamard matrix [m, m] float64 of a Paley order ``m``."""
    kind = _paley_kind(m)
    if kind == "I":
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    h = torch.kron(c, one) + torch.kron((c == 0).to(torch.float64), zero)
    return h


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def _hadamard64(n: int) -> torch.Tensor:
    plan = _plan(n)
    assert plan is not None
    pow2, orders = plan
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in orders:
        h = torch.kron(h, _paley(m))
    # Sylvester doubling of the Paley part: H_2n = [[H, H], [H, -H]] = kron(H_2, H)
    h = torch.kron(_sylvester(pow2), h) if orders else _sylvester(pow2)
    return h / math.sqrt(n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Deterministic orthonormal Hadamard matrix ``[n, n]`` (entries ``+-1/sqrt(n)``).

    ``n`` is a power of two (Sylvester) or ``2^a * m`` with Paley orders ``m`` (see the
    module docstring). Built in float64 and cast to ``dtype``; a new tensor each call.
    Raises ConfigError for any other ``n``, naming the nearest supported sizes.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"hadamard_matrix: size must be a positive int, got {n!r}")
    if _plan(n) is None:
        lo, hi = _neighbours(n)
        raise ConfigError(
            f"hadamard_matrix: no Hadamard matrix of size {n} can be built (powers of two, "
            f"Paley orders and their Kronecker products); nearest supported sizes: {lo} and "
            f"{hi}; use kind 'random' or a block size that divides {n}")
    return _hadamard64(n).clone().to(dtype)


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"rotation seed must be an int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


def _one_rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "hadamard":
        return hadamard_matrix(n)
    if kind == "random_hadamard":
        h = hadamard_matrix(n)
        s = torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64) * 2 - 1
        return s.to(torch.float64)[:, None] * h
    g = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return q * sign[None, :]


def rotation_matrix(kind: str, n: int, seed: int = 0, block: int | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal matrix ``[n, n]`` of ``kind`` (one of ROTATION_KINDS), cast to ``dtype``.

    ``"hadamard"``: :func:`hadamard_matrix` (``seed`` unused); ``"random_hadamard"``:
    ``diag(s) @ H`` with ``s`` seeded random +-1; ``"random"``: seeded Haar-random
    orthogonal (QR of a Gaussian, columns' signs fixed by ``diag(R) > 0``). With ``block``
    (int dividing ``n``): block-diagonal, ``n // block`` copies of the ``[block, block]``
    matrix of that kind. Seeds use a private generator (the global RNG is untouched).
    """
    if kind not in ROTATION_KINDS:
        raise ConfigError(f"rotation kind {kind!r} is unknown; expected one of {ROTATION_KINDS}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"rotation size must be a positive int, got {n!r}")
    if block is None:
        return _one_rotation(kind, n, seed).to(dtype)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ConfigError(f"rotation block must be a positive int or None, got {block!r}")
    if n % block:
        raise ConfigError(f"rotation block {block} does not divide the size {n}; "
                          f"expected a block size that divides {n}")
    r = _one_rotation(kind, block, seed)
    return torch.block_diag(*([r] * (n // block))).to(dtype)


def rotate_last(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ r`` over the last dim: ``x [..., n]``, ``r [n, n]`` or ``[b, b]`` with ``b | n``.

    A ``[b, b]`` matrix is applied block-diagonally (``x`` viewed as ``[..., n/b, b]``).
    Computed in float32 (float64 if ``x`` is float64) on ``x``'s device; returns ``x``'s dtype.
    """
    if r.dim() != 2 or r.shape[0] != r.shape[1]:
        raise ConfigError(f"rotate_last: rotation must be a square matrix, got shape "
                          f"{tuple(r.shape)}")
    n, b = x.shape[-1], r.shape[0]
    if n % b:
        raise ConfigError(f"rotate_last: rotation size {b} does not divide the input's last "
                          f"dim {n}; expected {n} or a divisor of it")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, rc = x.to(ct), r.to(device=x.device, dtype=ct)
    if b == n:
        out = xc @ rc
    else:
        out = (xc.reshape(*x.shape[:-1], n // b, b) @ rc).reshape(x.shape)
    return out.to(x.dtype)


def cayley(a: torch.Tensor) -> torch.Tensor:
    """Cayley transform ``(I - A)^-1 (I + A)`` of ``A = (a - a.T) / 2``: orthogonal ``[n, n]``.

    ``a [n, n]`` any square float tensor; differentiable in ``a`` (SpinQuant's
    parametrisation). Same dtype and device as ``a``.
    """
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ConfigError(f"cayley: expected a square matrix, got shape {tuple(a.shape)}")
    skew = (a - a.T) / 2
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - skew, eye + skew)


def is_orthogonal(r: torch.Tensor, tol: float = 1e-6) -> bool:
    """Whether ``r [n, n]`` satisfies ``max |r.T r - I| <= tol`` (checked in float64)."""
    if r.dim() != 2 or r.shape[0] != r.shape[1]:
        return False
    r64 = r.detach().to(torch.float64)
    eye = torch.eye(r.shape[0], dtype=torch.float64, device=r.device)
    return bool((r64.T @ r64 - eye).abs().max() <= tol)
