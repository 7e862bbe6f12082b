"""The matmul of the model's dense layers: x[..., K] @ w[K, N] as one [M, K] x [K, N] GEMM."""

from jax import lax


def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense(dot_general=...): the leading axes of x merged first.

  Same values. Why: on a [B, T, K] input, autodiff's weight gradient contracts B and T at once,
  and XLA:CPU copies the output gradient transposed, to [N, B*T], before that dot. Over merged
  rows the gradient is read in place: `mr`'s fine-tuning step went from 0.87x to 0.98x of HF
  PyTorch's, `bbc`'s from 0.82x to 0.97x (docs/RESULTS.md, session 19).
  """
  (lhs_c, rhs_c), batch = dimension_numbers
  if tuple(lhs_c) != (x.ndim - 1,) or tuple(rhs_c) != (0,) or batch != ((), ()) or w.ndim != 2:
    return lax.dot_general(x, w, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  y_MxN = lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
  return y_MxN.reshape(*x.shape[:-1], w.shape[1])
