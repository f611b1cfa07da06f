"""The exact (erf) GELU in float32 — a 5-term fit, in place, in cache-sized slices — and erf itself."""

from __future__ import annotations

import math
from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray

from gguf_sandbox.embed.rows import FLOAT_BYTES
from gguf_sandbox.embed.threads import SCRATCH_BYTES, thread_scratch

F32: TypeAlias = NDArray[np.float32]

# erf() is evaluated in slices of this many elements: its temporaries stay in L2 and far below the cap.
ERF_STEP: Final = 1 << 14
# GELU is evaluated in slices of this many elements, its 2 temporaries in the thread's scratch. Slices 4x
# longer than erf's need a quarter of the numpy calls, which on 2 threads is what GELU's time went to: each
# call takes the GIL.
GELU_STEP: Final = SCRATCH_BYTES // FLOAT_BYTES // 2
# Numerical Recipes' erfcc (Chebyshev fit): erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), with a
# fractional error below 1.2e-7 for every z >= 0. Coefficients of P, constant term first.
ERFC_COEFFICIENTS: Final = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)
_ERFC_F32: Final = tuple(np.float32(c) for c in ERFC_COEFFICIENTS)
# erf(z) = z * sum_n c_n z^(2n), c_n = 2/sqrt(pi) (-1)^n / (n! (2n + 1)); highest power first for polyval.
_ERF_SERIES: Final = tuple(
    np.float32(2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)))
    for n in reversed(range(8))
)


def erfc_nonneg(z: F32, out: F32) -> F32:
    """erfc(z) for z >= 0 into `out` (same shape as z), to a fractional error of about 1.2e-7."""
    t = np.multiply(z, np.float32(0.5))  # [n]
    t += np.float32(1.0)  # [n]
    np.reciprocal(t, out=t)  # [n] t = 1 / (1 + z/2)
    np.multiply(t, _ERFC_F32[-1], out=out)  # [n]
    for coefficient in _ERFC_F32[-2:0:-1]:
        out += coefficient  # [n]
        out *= t  # [n]
    out += _ERFC_F32[0]  # [n] P(t)
    z2 = np.multiply(z, z)  # [n]
    out -= z2  # [n] -z^2 + P(t)
    np.exp(out, out=out)  # [n]
    out *= t  # [n] erfc(z)
    return out


def erf(x: F32) -> F32:
    """erf(x) as a new float32 array, absolute error about 1e-7 (numpy has no erf; scipy is not a dep)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)  # [n]
    out = np.empty_like(flat)  # [n]
    for lo in range(0, flat.size, ERF_STEP):
        part = flat[lo : lo + ERF_STEP]  # [step]
        erfc_nonneg(np.abs(part), out[lo : lo + ERF_STEP])  # [step] erfc(|x|)
    np.subtract(np.float32(1.0), out, out=out)  # [n] erf(|x|)
    np.copysign(out, flat, out=out)  # [n]
    # Near 0, 1 - erfc cancels; the Maclaurin series is exact to float32 there.
    small = np.abs(flat) < np.float32(0.5)  # [n]
    z = flat[small]  # [k]
    out[small] = z * np.polyval(_ERF_SERIES, z * z).astype(np.float32)  # [k]
    return out.reshape(np.shape(x))


# Abramowitz & Stegun 7.1.26: erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2),
# t = 1 / (1 + p z), absolute error below 1.5e-7 for z >= 0. GELU needs erfc(|x| / sqrt 2) / 2: p carries the
# 1/sqrt 2 and the coefficients the 1/2 (highest first, for Horner): 5 multiply-adds, a reciprocal, an exp.
_AS_P: Final = np.float32(0.3275911 / math.sqrt(2.0))
_AS_HALF: Final = tuple(
    np.float32(c / 2) for c in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)
)


def _gelu_slice(x: F32, t: F32, tail: F32) -> None:
    """GELU of x (any 1-D or 2-D view) in place, with two scratch arrays of x's shape."""
    np.abs(x, out=t)  # |x|
    t *= _AS_P
    t += np.float32(1.0)
    np.reciprocal(t, out=t)  # t = 1 / (1 + p |x| / sqrt 2)
    np.multiply(t, _AS_HALF[0], out=tail)
    for coefficient in _AS_HALF[1:]:
        tail += coefficient
        tail *= t  # erfc polynomial / 2, times t
    np.multiply(x, x, out=t)
    t *= np.float32(-0.5)
    np.exp(t, out=t)  # exp(-x^2 / 2)
    tail *= t  # Phi(-|x|)
    np.abs(x, out=t)
    tail *= t  # |x| Phi(-|x|)
    np.maximum(x, np.float32(0.0), out=x)
    x -= tail  # max(x, 0) - |x| Phi(-|x|) = x Phi(x)


def gelu(x: F32) -> F32:
    """The exact (erf) GELU of x [rows, n] or [n], in place (x may be a strided view: a column block; never
    a view of this thread's scratch, which holds the temporaries); absolute error below 4e-7 for any
    float32, 2.5e-7 + 1.5e-7 |gelu(x)| as tested."""
    rows = x.reshape(1, -1) if x.ndim == 1 else x  # [rows, n]
    width = rows.shape[1]
    step = max(1, GELU_STEP // max(width, 1))  # rows per slice
    scratch = thread_scratch()
    if step * width > GELU_STEP:  # a row wider than a slice: temporaries of its own
        scratch = np.empty(2 * step * width, dtype=np.float32)
    size = min(step, rows.shape[0]) * width
    temporaries = scratch[: 2 * size].reshape(2, size)  # [2, step * n]
    # |x| beyond ~1.8e19 squares to infinity and its exp to 0: the right limit, so no warning.
    with np.errstate(over="ignore"):
        for lo in range(0, rows.shape[0], step):
            part = rows[lo : lo + step]  # [step, n]
            shape = part.shape
            count = shape[0] * shape[1]
            t, tail = (temporaries[i, :count].reshape(shape) for i in range(2))
            _gelu_slice(part, t, tail)
    return x
