r"""Differentiable in forward mode only, with an error that says so in reverse mode.

The T x T solves of most methods run ``lax.while_loop``\ s, which JAX can
differentiate in forward mode but not transpose. Reverse mode through such an
update would fail deep inside JAX (naming ``while_loop``, or a float64/float32
mismatch where the backward pass runs outside the local x64 scope).
:func:`guard_tangents` passes a JVP rule's tangents through an identity
whose transpose raises a :class:`TypeError` naming the package,
the cause and the fix (forward mode). Forward mode is untouched.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

REVERSE_MODE_MESSAGE = (
  "gradops_jax: reverse-mode differentiation (jax.grad, jax.vjp, jax.jacrev) through the update of "
  "{name} is not supported: its T x T solve is not written to be transposed (it runs iterative "
  "loops, lax.while_loop, which JAX cannot reverse). Forward mode works: use jax.jvp or "
  "jax.jacfwd, for example to differentiate with respect to a hyperparameter or through a "
  "training step. Linear scalarisation supports both modes."
)

_guard_p = Primitive("gradops_jax_forward_only")
_guard_p.def_impl(lambda tangent, *, name: tangent)
_guard_p.def_abstract_eval(lambda tangent, *, name: tangent)
mlir.register_lowering(_guard_p, lambda ctx, tangent, *, name: [tangent])
batching.primitive_batchers[_guard_p] = lambda args, dims, *, name: (_guard_p.bind(args[0], name=name), dims[0])


def _transpose(cotangent, tangent, *, name):
  del cotangent, tangent
  raise TypeError(REVERSE_MODE_MESSAGE.format(name=name))


ad.deflinear2(_guard_p, _transpose)


def guard_tangents(tangents: Any, name: str) -> Any:
  """The tangents, unchanged in forward mode; transposing them raises the reverse-mode error.

  Args:
    tangents: a pytree of tangents (float0 leaves, of integer outputs, pass as they are).
    name: how the error message names the transform.

  Returns:
    ``tangents``, each floating leaf passed through the guarding identity.
  """

  def guard(tangent):
    if not jnp.issubdtype(jnp.result_type(tangent), jnp.inexact):
      return tangent
    return _guard_p.bind(tangent, name=name)

  return jax.tree.map(guard, tangents)
