"""The matmul of the model's dense layers: x[..., K] @ w[K, N] as one [M, K] x [K, N] GEMM."""

import math

from jax import lax

from mp_jax.model import cpu_gemm


def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` for nn.Dense(dot_general=...): the leading axes of x merged first.

  The same values up to float rounding. Why: on a [B, T, K] input, autodiff's weight gradient
  contracts B and T at once, and XLA:CPU copies the output gradient transposed, to [N, B*T],
  before that dot; over merged rows it reads it in place. The clock's training step went from
  0.89x to 0.99x of HF PyTorch's on `mr`, 0.82x to 0.97x on `bbc` (docs/RESULTS.md, session
  19). Measured on XLA:CPU only; on GPU/TPU it is the same GEMM, not timed there. On CPU
  a float32 GEMM is MKL's where it can be (cpu_gemm.py).
  """
  (lhs_c, rhs_c), batch = dimension_numbers
  kw.update(precision=precision, preferred_element_type=preferred_element_type)
  if tuple(lhs_c) != (x.ndim - 1,) or tuple(rhs_c) != (0,) or batch != ((), ()) or w.ndim != 2:
    return lax.dot_general(x, w, dimension_numbers, **kw)
  x_MxK = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
  y_MxN = cpu_gemm.matmul(x_MxK, w, **kw)
  return y_MxN.reshape(*x.shape[:-1], w.shape[1])
