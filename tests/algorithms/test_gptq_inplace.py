"""The in-place blocked Cholesky of GPTQ's Hessian: exact factor, undo on failure."""

import pytest
import torch

from lowbit.algorithms.gptq import cholesky_lower_inplace, restore_lower


@pytest.mark.parametrize("n,block", [(7, 3), (64, 16), (100, 32), (50, 64)])
def test_blocked_cholesky_matches_lapack_and_keeps_upper(n, block):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    H = X.T @ X + 0.1 * torch.eye(n, dtype=torch.float64)
    A = H.clone()
    assert cholesky_lower_inplace(A, block)
    torch.testing.assert_close(torch.tril(A), torch.linalg.cholesky(H), rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.triu(A, 1), torch.triu(H, 1))


def test_failure_restores_the_matrix_exactly():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 40, generator=g)
    H = X.T @ X  # rank 10 of 40: not positive definite
    H[30, 30] = -1.0
    A = H.clone()
    assert not cholesky_lower_inplace(A, 16)
    restore_lower(A, torch.diag(H).clone(), 16)
    assert torch.equal(A, H)
