"""The one list of methods that every battery of the test suite reads.

Adding a method: its module under ``gradops_jax/_src/methods/``, its export in
``gradops_jax/__init__.py``, and one :class:`MethodSpec` here (plus,
optionally, a test file of its own). ``tests/test_registry.py`` fails when a
public ``scale_by_*`` is missing from this list. The battery
(``test_battery.py``), the validation tests, the hypothesis properties, the
torchjd golden comparison, the multi-device script and the benchmarks take
their methods from here.
"""

import dataclasses
from typing import Any, Callable, Optional

import gradops_jax

NAN, INF = float("nan"), float("inf")
TOL_BAD = {"tol": [-1e-3, NAN, INF]}
MAX_ITERS_BAD = [(0, ValueError), (-5, ValueError), (10.0, TypeError)]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One registered transform.

  Attributes:
    name: the test id.
    factory: ``num_tasks -> optax.GradientTransformation``.
    public: the public ``scale_by_*`` function it exercises.
    deterministic: whether the update is a function of the tasks alone (not
      of a random visiting order).
    guarantee: what its property test checks: ``"no_conflict"``,
      ``"min_norm"``, ``"cone"``, ``"ball"``, ``"pcgrad"``, ``"aligned"``,
      ``"sum"`` or ``"finite"``.
    reference: the float64 NumPy reading in ``tests/reference.py``, if any.
    bad_hyperparameters: ``{keyword: [bad values]}`` that must raise ``ValueError``.
    iterative: whether it has ``tol`` and ``max_iters``.
    torchjd: torchjd's aggregator key in the golden file, if any.
  """

  name: str
  factory: Callable[[int], Any]
  public: Callable[..., Any]
  deterministic: bool = True
  guarantee: str = "finite"
  reference: Optional[str] = None
  bad_hyperparameters: dict = dataclasses.field(default_factory=dict)
  iterative: bool = False
  torchjd: Optional[str] = None


SPECS = (
  MethodSpec(
    "gradops",
    lambda t, **kw: gradops_jax.scale_by_gradops(t, **kw),
    gradops_jax.scale_by_gradops,
    guarantee="no_conflict",
    reference="gradops_reference",
    bad_hyperparameters={"alpha": [NAN, INF, -INF], "rank_rtol": [-1e-3, 1.0, 2.0, NAN, INF]},
  ),
  MethodSpec(
    "gradops_alpha-2",
    lambda t, **kw: gradops_jax.scale_by_gradops(t, alpha=-2.0, **kw),
    gradops_jax.scale_by_gradops,
    guarantee="no_conflict",
    reference="gradops_reference",
  ),
  MethodSpec(
    "mgda",
    gradops_jax.scale_by_mgda,
    gradops_jax.scale_by_mgda,
    guarantee="min_norm",
    reference="min_norm_point_weights",
    bad_hyperparameters=TOL_BAD,
    iterative=True,
    torchjd="mgda",
  ),
  MethodSpec(
    "upgrad",
    gradops_jax.scale_by_upgrad,
    gradops_jax.scale_by_upgrad,
    guarantee="no_conflict",
    reference="upgrad_reference",
    bad_hyperparameters=TOL_BAD,
    iterative=True,
    torchjd="upgrad",
  ),
  MethodSpec(
    "pcgrad",
    gradops_jax.scale_by_pcgrad,
    gradops_jax.scale_by_pcgrad,
    deterministic=False,
    guarantee="pcgrad",
    reference="pcgrad_reference",
    torchjd="pcgrad",
  ),
  MethodSpec(
    "gradvac",
    gradops_jax.scale_by_gradvac,
    gradops_jax.scale_by_gradvac,
    deterministic=False,
    reference="gradvac_reference",
    bad_hyperparameters={"beta": [-0.1, 1.5, NAN]},
    torchjd="gradvac",
  ),
  MethodSpec(
    "imtl_g",
    gradops_jax.scale_by_imtl_g,
    gradops_jax.scale_by_imtl_g,
    reference="imtl_g_reference",
    torchjd="imtl_g",
  ),
  MethodSpec(
    "cagrad",
    gradops_jax.scale_by_cagrad,
    gradops_jax.scale_by_cagrad,
    guarantee="ball",
    reference="cagrad_reference",
    bad_hyperparameters={"c": [-0.1, NAN, INF], **TOL_BAD},
    iterative=True,
    torchjd="cagrad",
  ),
  MethodSpec(
    "conicgrad",
    gradops_jax.scale_by_conicgrad,
    gradops_jax.scale_by_conicgrad,
    guarantee="cone",
    bad_hyperparameters={"c": [-0.1, 1.5, NAN, INF], **TOL_BAD},
    iterative=True,
  ),
  MethodSpec(
    "aligned_mtl",
    gradops_jax.scale_by_aligned_mtl,
    gradops_jax.scale_by_aligned_mtl,
    guarantee="aligned",
    reference="aligned_mtl_reference",
    torchjd="aligned_mtl",
  ),
  MethodSpec(
    "nash_mtl",
    gradops_jax.scale_by_nash_mtl,
    gradops_jax.scale_by_nash_mtl,
    bad_hyperparameters=TOL_BAD,
    iterative=True,
  ),
  MethodSpec(
    "linear_scalarization",
    gradops_jax.scale_by_linear_scalarization,
    gradops_jax.scale_by_linear_scalarization,
    guarantee="sum",
    bad_hyperparameters={"weights": [[1.0, NAN], [INF, 1.0]]},
    torchjd="mean",
  ),
)

BY_NAME = {spec.name: spec for spec in SPECS}
NAMES = sorted(BY_NAME)
DETERMINISTIC = sorted(spec.name for spec in SPECS if spec.deterministic)
ITERATIVE = sorted(spec.name for spec in SPECS if spec.iterative)
# name -> (factory(num_tasks), deterministic in the task order?), the form the batteries use.
METHODS = {spec.name: (spec.factory, spec.deterministic) for spec in SPECS}
