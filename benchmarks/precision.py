"""The float32 precision mode against the float64 one: accuracy on hard cases, and speed.

    python -m benchmarks.precision --quick   # a few minutes on 2 CPU cores
    python -m benchmarks.precision --tiny    # seconds; what the smoke test runs

**Accuracy.** For every method and every family of hard cases (near-collinear
tasks at cosine 1 - 1e-4 and 1 - 1e-6, rank-deficient, scales 1e-20..1e20,
opposite and zero tasks, plain conflicting ones; each at small T and at
T = 64, over a few seeds), the worst relative error of the update against
the float64 reading: of the float32 mode, of the float64 mode, and of the
method's weighting run in float32 on a naive float32 Gram matrix (``G Gᵀ``
of the float32 gradients, no scaling, no compensation: casting down). The
float64 reading is the literal float64 NumPy reading of ``tests/reference.py``
where the method has one that the update equals (GradOPS, mean; MGDA and
UPGrad at T <= 10, whose readings enumerate supports), else the float64
mode (which the test suite checks against the readings). The error is
``|d - d_ref|`` over ``|d_ref|``, or over float32's rounding of the largest
task, ``eps32 max_i |g_i|``, where that is larger (an update of tasks that cancel is rounding noise in either mode).

**Speed.** The jitted update in both modes, side by side
(:func:`benchmarks.run.median_times`), on one ``(T, D)`` float32 leaf: on
the default CPU path (C++ kernels in float64 mode) and on the XLA path that
GPU and TPU run (:func:`gradops_jax.kernels_disabled`).
"""

import functools
import os
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

import gradops_jax
from benchmarks.run import aggregator_step
from benchmarks.run import cpu_model
from benchmarks.run import median_times
from benchmarks.run import mode_parser
from benchmarks.run import params_like
from tests import reference

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("tiny", "quick")
ONE_MINUS_COSINES = (1e-3, 1e-4, 1e-6)


def _conflicting(rng, num_tasks, dim):
  shared = rng.standard_normal(dim)
  signs = rng.choice([-1.0, 1.0], size=(num_tasks, 1))
  return 0.8 * signs * shared + rng.standard_normal((num_tasks, dim))


def _with_pair(rng, num_tasks, dim, one_minus_cos):
  """Conflicting tasks, two of them at cosine ``1 - one_minus_cos``."""
  grads = _conflicting(rng, num_tasks, dim)
  base = grads[0] / np.linalg.norm(grads[0])
  other = rng.standard_normal(dim)
  other -= (other @ base) * base
  other /= np.linalg.norm(other)
  grads[1] = np.linalg.norm(grads[0]) * ((1 - one_minus_cos) * base + np.sqrt(1 - (1 - one_minus_cos) ** 2) * other)
  return grads


def case_families(num_tasks, seed):
  """``{family: (T, D) float32 matrix}`` at ``num_tasks`` tasks."""
  rng = np.random.default_rng(seed)
  dim = 1000
  families = {
    "conflicting": _conflicting(rng, num_tasks, dim),
    **{f"collinear 1-{x:.0e}": _with_pair(rng, num_tasks, dim, x) for x in ONE_MINUS_COSINES},
  }
  deficient = _conflicting(rng, num_tasks, dim if num_tasks <= 8 else num_tasks // 2)
  deficient[-1] = deficient[0] + deficient[1]
  families["rank-deficient"] = deficient
  for low, high in ((-9, 9), (-20, 20)):
    scales = 10.0 ** rng.uniform(low, high, size=(num_tasks, 1))
    scales[:2, 0] = [10.0**low, 10.0**high]
    families[f"scales 1e{low}..1e{high}"] = _conflicting(rng, num_tasks, dim) * scales
  opposite = _conflicting(rng, num_tasks, dim)
  opposite[1] = -opposite[0]
  opposite[2] = 0.0
  families["opposite & zero"] = opposite
  return {name: matrix.astype(np.float32) for name, matrix in families.items()}


def _mean_reading(grads):
  return grads.mean(axis=0)


def _reading(name, grads):
  """The float64 NumPy reading of the update, where the method has one the update equals."""
  num_tasks = grads.shape[0]
  if name == "GradOPS":
    try:
      return reference.gradops_reference(grads, 0.0, gradops_jax.default_rank_rtol(num_tasks))[0]
    except ValueError:  # its MGDA fallback fired, whose reading enumerates supports (T <= 10)
      return None
  if name == "MGDA" and num_tasks <= 10:  # an exhaustive reading over the supports
    return reference.min_norm_point_weights(grads) @ grads
  if name == "UPGrad" and num_tasks <= 10:  # an exhaustive reading over the active sets
    return reference.upgrad_reference(grads)
  if name == "Mean":
    return _mean_reading(grads)
  return None


def _transforms(num_tasks, precision):
  return {
    "GradOPS": gradops_jax.scale_by_gradops(num_tasks, precision=precision),
    "MGDA": gradops_jax.scale_by_mgda(num_tasks, precision=precision),
    "UPGrad": gradops_jax.scale_by_upgrad(num_tasks, precision=precision),
    "PCGrad": gradops_jax.scale_by_pcgrad(num_tasks, precision=precision),
    "GradVac": gradops_jax.scale_by_gradvac(num_tasks, precision=precision),
    "IMTL-G": gradops_jax.scale_by_imtl_g(num_tasks, precision=precision),
    "CAGrad": gradops_jax.scale_by_cagrad(num_tasks, precision=precision),
    "ConicGrad": gradops_jax.scale_by_conicgrad(num_tasks, precision=precision),
    "Aligned-MTL": gradops_jax.scale_by_aligned_mtl(num_tasks, precision=precision),
    "Nash-MTL": gradops_jax.scale_by_nash_mtl(num_tasks, precision=precision),
    "Mean": gradops_jax.scale_by_linear_scalarization(num_tasks, precision=precision),
  }


# The weighting of each method, on a Gram matrix (None: it needs a task order, not compared).
_WEIGHTINGS = {
  "GradOPS": gradops_jax.weightings.gradops,
  "MGDA": gradops_jax.weightings.mgda,
  "UPGrad": gradops_jax.weightings.upgrad,
  "IMTL-G": gradops_jax.weightings.imtl_g,
  "CAGrad": gradops_jax.weightings.cagrad,
  "ConicGrad": gradops_jax.weightings.conicgrad,
  "Aligned-MTL": gradops_jax.weightings.aligned_mtl,
  "Nash-MTL": gradops_jax.weightings.nash_mtl,
  "Mean": gradops_jax.weightings.mean,
}


@functools.lru_cache(maxsize=None)
def _naive_weights(name):
  """The weighting on ``G Gᵀ`` formed and solved in float32: what casting the float64 mode down gives."""

  def weights(matrix):
    return _WEIGHTINGS[name](jnp.matmul(matrix, matrix.T, precision=jax.lax.Precision.HIGHEST))

  return jax.jit(weights)


def _error(update, expected, grads):
  """``|d - d_ref|`` over ``|d_ref|``, or over float32's rounding of the largest task where that is larger."""
  update, expected = np.asarray(update, np.float64), np.asarray(expected, np.float64)
  if not np.all(np.isfinite(update)):
    return np.inf
  rounding = float(np.finfo(np.float32).eps) * np.linalg.norm(grads, axis=1).max()
  size = max(np.linalg.norm(expected), rounding, np.finfo(np.float64).tiny)
  return np.linalg.norm(update - expected) / size


def bench_accuracy(tasks, seeds, methods=None, progress=print):
  """Rows ``{method, family, float32, float64, naive, reading}``: worst errors; is the reference a reading?"""
  worst: dict = {}
  for num_tasks in tasks:
    steps = {}  # one compiled update per (method, mode) for every case of this T
    for seed in seeds:
      for family, matrix in case_families(num_tasks, seed).items():
        grads = matrix.astype(np.float64)
        tree = {"w": jnp.asarray(matrix)}
        params = params_like(tree)
        for name in methods or _transforms(num_tasks, "float64"):
          for precision in ("float32", "float64"):
            if (name, precision, matrix.shape) not in steps:
              steps[name, precision, matrix.shape] = aggregator_step(_transforms(num_tasks, precision)[name], params)
          updates = {p: steps[name, p, matrix.shape](tree)["w"] for p in ("float32", "float64")}
          reading = _reading(name, grads)
          expected = updates["float64"] if reading is None else reading
          row = worst.setdefault((name, family), {"float32": 0.0, "float64": 0.0, "naive": None})
          row["reading"] = row.get("reading", True) and reading is not None
          row["float32"] = max(row["float32"], _error(updates["float32"], expected, grads))
          row["float64"] = max(row["float64"], _error(updates["float64"], expected, grads))
          if name in _WEIGHTINGS:
            weights = np.asarray(_naive_weights(name)(jnp.asarray(matrix)), np.float64)
            naive = _error(weights @ grads, expected, grads) if np.all(np.isfinite(weights)) else np.inf
            row["naive"] = max(row["naive"] or 0.0, naive)
      progress(f"precision: accuracy T={num_tasks} done")
  return [{"method": name, "family": family, **row} for (name, family), row in worst.items()]


def _without_kernels(step):
  """``step`` called inside :func:`gradops_jax.kernels_disabled` (part of the jit key: every call)."""

  def call(*args):
    with gradops_jax.kernels_disabled():
      return step(*args)

  return call


def bench_speed(tasks, dims, repeats, progress=print):
  """Update time of both modes side by side, on the default CPU path and on the XLA path."""
  rows = []
  for path in ("default", "xla"):
    for num_tasks in tasks:
      for dim in dims:
        tree = {"w": jax.random.normal(jax.random.key(0), (num_tasks, dim), jnp.float32)}
        params = params_like(tree)
        for name in ("GradOPS", "UPGrad", "MGDA"):
          calls = {}
          for mode in ("float64", "float32"):
            step = aggregator_step(_transforms(num_tasks, mode)[name], params)
            calls[mode] = (_without_kernels(step) if path == "xla" else step, (tree,))
          times = median_times(calls, repeats)
          rows.append(
            {
              "path": path,
              "method": name,
              "T": num_tasks,
              "D": dim,
              "float64_ms": 1e3 * times["float64"],
              "float32_ms": 1e3 * times["float32"],
              "float32_over_float64": times["float32"] / times["float64"],
            }
          )
      progress(f"precision: speed {path} T={num_tasks} done")
  return rows


def run(mode, progress=print):
  if mode == "tiny":
    accuracy = bench_accuracy((3,), (0,), ("GradOPS", "IMTL-G", "Mean"), progress)
    return {"accuracy": accuracy, "speed": bench_speed((4,), (1000,), 3, progress)}
  return {
    "accuracy": bench_accuracy((4, 64), (0, 1, 2), None, progress),
    "speed": bench_speed((8, 64), (100_000, 1_000_000), 10, progress),
  }


def _cell(value):
  if value is None:
    return "—"
  if not np.isfinite(value):
    return "inf/NaN"
  return "0" if value == 0 else f"{value:.1e}"


def markdown(results):
  lines = [
    f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()}; "
    f"jax {jax.__version__}, backend {jax.default_backend()}.",
    "",
    "### Accuracy: worst relative error of the update against the float64 reading",
    "",
    "Reference: the literal float64 reading (†) or the float64 mode. Naive: the method's weighting "
    "on a float32 `G Gᵀ` solved in float32 (— where the method needs a task order). Target: at most "
    "1e-4 in the float32 mode where the tasks' cosines are at most 1 - 1e-4 (every family but "
    "`collinear 1-1e-06`).",
    "",
    "| method | case family | float32 mode | float64 mode | naive float32 Gram |",
    "|---|---|---:|---:|---:|",
  ]
  for row in results["accuracy"]:
    mark = " †" if row["reading"] else ""
    cells = " | ".join(_cell(row[key]) for key in ("float32", "float64", "naive"))
    lines.append(f"| {row['method']}{mark} | {row['family']} | {cells} |")
  lines += [
    "",
    "### Speed: float32 mode over float64 mode (medians side by side)",
    "",
    "| path | method | T | D | float64 (ms) | float32 (ms) | float32 / float64 |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for row in results["speed"]:
    lines.append(
      f"| {row['path']} | {row['method']} | {row['T']} | {row['D']:.0e} | {row['float64_ms']:.2f} | "
      f"{row['float32_ms']:.2f} | {row['float32_over_float64']:.2f} |"
    )
  return "\n".join(lines) + "\n"


def command_line(doc, run_fn, markdown_fn, stem, argv=None):
  """Runs ``run_fn(mode)`` for ``--tiny`` or ``--quick``, prints its tables, and writes them (not for ``--tiny``)
  to ``<out>/<stem(results)>-<mode>.md``."""
  args = mode_parser(doc, MODES, RESULTS).parse_args(argv)
  mode = args.mode or "quick"
  results = run_fn(mode, progress=lambda message: print(message, file=sys.stderr, flush=True))
  text = markdown_fn(results)
  print(text)
  if mode != "tiny":
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem(results)}-{mode}.md").write_text(text)
  return results


def main(argv=None):
  return command_line(__doc__, run, markdown, lambda _: "precision", argv)


if __name__ == "__main__":
  main()
