"""Every iterative solve reports in its state whether it converged and in how many steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradops_jax
from tests import cases as cases_lib
from tests import registry

CASES = cases_lib.hard_cases()
# Methods whose first-order loop has no exact finish: a cap that stops the loop is never certified.
WITHOUT_EXACT_FINISH = ("cagrad", "conicgrad", "nash_mtl")


def _state(tx, matrix):
  params = {"w": jnp.zeros(matrix.shape[1])}
  _, state = jax.jit(tx.update)({"w": jnp.asarray(matrix)}, tx.init(params), params)
  return state


@pytest.mark.parametrize("method", registry.ITERATIVE)
def test_converged_solve_reports_its_steps(method):
  state = _state(registry.BY_NAME[method].public(8), CASES["conflicting_T8"])
  assert bool(state.converged)
  assert 1 <= int(state.num_steps) <= 5000


@pytest.mark.parametrize("method", registry.ITERATIVE)
def test_iteration_cap_is_reported(method):
  state = _state(registry.BY_NAME[method].public(8, tol=0.0, max_iters=2), CASES["conflicting_T8"])
  assert int(state.num_steps) <= 2
  if method in WITHOUT_EXACT_FINISH:
    assert not bool(state.converged)


def test_closed_form_methods_report_no_steps():
  for factory in (gradops_jax.scale_by_imtl_g, gradops_jax.scale_by_aligned_mtl):
    state = _state(factory(5), CASES["conflicting_T5"])
    assert bool(state.converged) and int(state.num_steps) == 0


def test_gradops_reports_its_fallback_solve():
  state = _state(gradops_jax.scale_by_gradops(3), CASES["fallback_nonzero_mgda"])
  assert bool(state.used_fallback) and bool(state.converged) and int(state.num_steps) >= 1
  state = _state(gradops_jax.scale_by_gradops(5), CASES["conflicting_T5"])
  assert not bool(state.used_fallback) and int(state.num_steps) == 0
  np.testing.assert_allclose(float(np.sum(state.alpha_weights)), 5.0, rtol=1e-5)
