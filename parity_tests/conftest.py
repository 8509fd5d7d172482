"""Parity tests compare torch and jax at fp32 with the highest matmul precision."""

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from parity_tests.tolerances import TOLERANCES  # noqa: E402


def max_rel(a, ref) -> float:
    """max|a - ref| / max|ref|."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def rel_l2(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture
def tol():
    return TOLERANCES
