"""lowbit.core.rotation: Hadamard matrices (Sylvester, Paley I/II, Kronecker), seeded random
rotations, block-diagonal application, Cayley transform, and the refusal of sizes that
cannot be built."""

import math

import pytest
import torch

from lowbit.core import (ROTATION_KINDS, cayley, hadamard_matrix, is_hadamard_size,
                         is_orthogonal, rotate_last, rotation_matrix)
from lowbit.errors import ConfigError

# every width a rotation is used at: head dims, hiddens (576 = 36*16 and 1536 = 12*128 on
# SmolLM2-135M, 640 = 20*32 on others), intermediates, and the paley orders themselves
SIZES = [1, 2, 12, 16, 20, 28, 32, 36, 44, 64, 76, 108, 128, 144, 576, 640, 1536, 2048]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_orthonormal_and_pm_entries(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert is_orthogonal(h, tol=1e-6)
    assert torch.equal(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))
    assert is_hadamard_size(n)


def test_hadamard_4096_exact():
    """4096: the +-1 integer matrix satisfies H H^T = n I exactly (float32 sums of integers
    below 2^24 are exact), which implies orthonormality to 1e-6 (one float32 product instead
    of is_orthogonal's float64 one: this size is the slow one)."""
    h = hadamard_matrix(4096)
    s = h * 64
    assert torch.equal(s.abs(), torch.ones_like(s))
    s = s.to(torch.float32)
    assert torch.equal(s @ s.T, 4096 * torch.eye(4096))


@pytest.mark.slow
def test_hadamard_11008_paley_5504():
    """11008 = 2 * 5504, 5504 = 5503 + 1 with 5503 a prime = 3 mod 4 (Paley I): the +-1
    matrix is [[P, P], [P, -P]] with P P^T = 5504 I exactly (integer sums in float32), hence
    H H^T = I (the full 11008^3 product takes minutes on two cores)."""
    assert is_hadamard_size(11008)
    h = hadamard_matrix(11008, dtype=torch.float32)
    s = (h * math.sqrt(11008)).round()
    assert torch.equal(s.abs(), torch.ones_like(s))
    p = s[:5504, :5504]
    assert torch.equal(s[:5504, 5504:], p) and torch.equal(s[5504:, :5504], p)
    assert torch.equal(s[5504:, 5504:], -p)
    assert torch.equal(p @ p.T, 5504 * torch.eye(5504))


@pytest.mark.parametrize("n", [2, 4, 16, 64, 128, 1024, 4096])
def test_power_of_two_is_sylvester(n):
    """H_2n = [[H, H], [H, -H]] from [1], normalised."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert torch.equal(hadamard_matrix(n), h / math.sqrt(n))


@pytest.mark.parametrize("n", [16, 128, 2048])
def test_power_of_two_matches_compressed_tensors(n):
    ct = pytest.importorskip("compressed_tensors.transform.utils.hadamard")
    ref = ct.deterministic_hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)
    assert torch.equal(hadamard_matrix(n), ref)


@pytest.mark.parametrize("n,m", [(576, 36), (1536, 12), (640, 20)])
def test_non_power_of_two_is_sylvester_doubling_of_paley(n, m):
    """n = 2^a * m: the top-left [m, m] block is the Paley matrix, and the matrix is
    [[H, H], [H, -H]] of its half."""
    h = hadamard_matrix(n) * math.sqrt(n)
    half = n // 2
    top, bottom = h[:half], h[half:]
    assert torch.equal(top[:, :half], top[:, half:])
    assert torch.equal(bottom[:, :half], -bottom[:, half:])
    assert torch.equal(top[:, :half], bottom[:, :half])
    assert torch.equal(h[:m, :m], hadamard_matrix(m) * math.sqrt(m))


def test_deterministic_and_dtype():
    a, b = hadamard_matrix(576), hadamard_matrix(576)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    a.zero_()  # callers get a copy: the cache is not changed
    assert torch.equal(hadamard_matrix(576), b)
    assert hadamard_matrix(64, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n,lo,hi", [(172, 168, 176), (100, 96, 104), (6, 4, 8), (3, 2, 4)])
def test_unsupported_size_refused_naming_neighbours(n, lo, hi):
    assert not is_hadamard_size(n)
    with pytest.raises(ConfigError) as e:
        hadamard_matrix(n)
    msg = str(e.value)
    assert "\n" not in msg and f"size {n}" in msg
    assert f"nearest supported sizes: {lo} and {hi}" in msg
    assert is_hadamard_size(lo) and is_hadamard_size(hi)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "16"])
def test_bad_size_type(bad):
    with pytest.raises(ConfigError, match="positive int"):
        hadamard_matrix(bad)
    assert not is_hadamard_size(bad) if not isinstance(bad, str) else True


@pytest.mark.parametrize("kind", ROTATION_KINDS)
@pytest.mark.parametrize("n,block", [(64, None), (576, None), (640, None), (1536, None),
                                     (128, 16), (576, 16), (640, 32), (1536, 32),
                                     (2048, 16), (4096, 32)])
def test_rotation_matrix_orthogonal(kind, n, block):
    r = rotation_matrix(kind, n, seed=3, block=block)
    assert r.shape == (n, n) and r.dtype == torch.float64
    if block is not None:
        # block-diagonal: copies of one [block, block] matrix, zero elsewhere
        b = r[:block, :block]
        assert torch.equal(r, torch.block_diag(*[b] * (n // block)))
        assert torch.equal(b, rotation_matrix(kind, block, seed=3))
        assert is_orthogonal(b, tol=1e-6)
    else:
        assert is_orthogonal(r, tol=1e-6)
    if kind != "random":
        size = block or n
        assert torch.allclose(r[:size, :size].abs(), torch.full((size, size), size ** -0.5,
                                                                 dtype=torch.float64),
                              rtol=0, atol=1e-15)


def test_seeds_reproducible_and_private():
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    a = rotation_matrix("random", 64, seed=7)
    b = rotation_matrix("random_hadamard", 64, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "the global RNG was used"
    torch.manual_seed(999)
    assert torch.equal(a, rotation_matrix("random", 64, seed=7))
    assert torch.equal(b, rotation_matrix("random_hadamard", 64, seed=7))
    assert not torch.equal(a, rotation_matrix("random", 64, seed=8))
    assert not torch.equal(b, rotation_matrix("random_hadamard", 64, seed=8))
    assert torch.equal(rotation_matrix("hadamard", 64, seed=1), rotation_matrix("hadamard", 64))
    torch.set_rng_state(state)


def test_random_hadamard_is_signed_rows_of_hadamard():
    r = rotation_matrix("random_hadamard", 576, seed=5)
    h = hadamard_matrix(576)
    s = (r / h)[:, 0]
    assert set(s.tolist()) == {1.0, -1.0}
    assert torch.equal(r, s[:, None] * h)


def test_random_haar_sign_fix():
    """QR with the sign fix: R of the Gaussian's QR has a positive diagonal (Haar measure)."""
    g = torch.randn(32, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    q = rotation_matrix("random", 32, seed=11)
    r = q.T @ g
    assert torch.allclose(torch.tril(r, -1), torch.zeros_like(r), atol=1e-10)
    assert (torch.diagonal(r) > 0).all()


@pytest.mark.parametrize("kwargs,msg", [
    ({"kind": "walsh", "n": 16}, "rotation kind 'walsh' is unknown"),
    ({"kind": "hadamard", "n": 48, "block": 32}, "rotation block 32 does not divide the size 48"),
    ({"kind": "hadamard", "n": 48, "block": 0}, "rotation block must be a positive int"),
    ({"kind": "random", "n": 16, "seed": 1.5}, "rotation seed must be an int"),
    ({"kind": "hadamard", "n": 0}, "rotation size must be a positive int"),
    ({"kind": "hadamard", "n": 172}, "no Hadamard matrix of size 172"),
])
def test_rotation_matrix_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        rotation_matrix(**kwargs)


@pytest.mark.parametrize("n,b", [(64, 64), (64, 16), (576, 16), (640, 32), (1536, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotate_last_equals_blockdiag(n, b, dtype):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    r = rotation_matrix("random_hadamard", b, seed=2)
    full = torch.block_diag(*[r] * (n // b))
    ref = (x.to(torch.float64) @ full)
    out = rotate_last(x, r)
    assert out.dtype == dtype and out.shape == x.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    assert torch.allclose(out.to(torch.float64), ref, rtol=tol, atol=tol)
    assert torch.allclose(rotate_last(x, full), out, rtol=tol, atol=tol)


def test_rotate_last_errors():
    with pytest.raises(ConfigError, match="rotation size 24 does not divide"):
        rotate_last(torch.randn(2, 64), torch.eye(24))
    with pytest.raises(ConfigError, match="square matrix"):
        rotate_last(torch.randn(2, 64), torch.eye(64)[:32])


def test_rotate_last_preserves_norm_and_spreads_outlier():
    x = torch.zeros(1, 576)
    x[0, 7] = 100.0
    y = rotate_last(x, hadamard_matrix(576))
    assert torch.allclose(y.norm(), x.norm())
    assert y.abs().max() < 100.0 / 20  # one outlier is spread over all 576 channels


def test_cayley_orthogonal_and_differentiable():
    a = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a.requires_grad_(True)
    q = cayley(a)
    assert is_orthogonal(q, tol=1e-10)
    assert torch.allclose(cayley(torch.zeros(8, 8)), torch.eye(8))
    loss = (q[:, :3] ** 3).sum()
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # gradient agrees with finite differences along a random direction
    d = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eps = 1e-6
    with torch.no_grad():
        fd = (((cayley(a + eps * d)[:, :3] ** 3).sum() - (cayley(a - eps * d)[:, :3] ** 3).sum())
              / (2 * eps))
    assert torch.allclose((a.grad * d).sum(), fd, rtol=1e-5, atol=1e-8)
    # float32 stays orthogonal to 1e-5
    assert is_orthogonal(cayley(torch.randn(64, 64)), tol=1e-5)
    with pytest.raises(ConfigError, match="square matrix"):
        cayley(torch.randn(3, 4))


def test_is_orthogonal():
    assert is_orthogonal(torch.eye(5))
    assert not is_orthogonal(2 * torch.eye(5))
    assert not is_orthogonal(torch.eye(5)[:3])
    r = hadamard_matrix(16)
    r[0, 0] += 1e-4
    assert not is_orthogonal(r, tol=1e-6)
