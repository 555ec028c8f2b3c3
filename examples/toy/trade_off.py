r"""The two-objective toy problem of the GradOPS paper (Appendix B, Figure 2).

Two losses of :math:`\theta = (\theta_1, \theta_2) \in \mathbb{R}^2` (Zhu et al.,
WSDM 2025, Appendix B, adapted by them from the CAGrad paper's example):

.. math::

  L_1 = c_1 f_1 + c_2 g_1, \qquad L_2 = c_1 f_2 + c_2 g_2,

  f_{1,2} = \log\max(|5(-\theta_1 \mp 0.7) - \tanh(-3\theta_2)|, 0.0005) + 1,

  g_{1,2} = 1.5\tanh(2(-\theta_1 \pm 0.7)^2)(\theta_1^2 + 1) + (-\theta_2 - 0.8)^2 - 2.5,

  c_1 = \max(\tanh(5\theta_2), 0), \qquad c_2 = \max(\tanh(-5\theta_2), 0).

The paper prints :math:`L_1 = c_1 f_1 + c_2 f_1` (and the same for
:math:`L_2`), which leaves :math:`g_1, g_2` unused; we read it as
:math:`c_2 g_1`, as in the CAGrad example it adapts. From the three initial
points of the paper, every method takes 20,000 Adam steps (learning rate
1e-3) on its aggregated gradient. The script draws the trajectories on the
contours of :math:`L_1 + L_2` and in objective space beside the Pareto front
(the non-dominated points of a dense grid), and writes a table of the final
points with their distance to that front::

    python examples/toy/trade_off.py            # 20,000 steps, as the paper
    python examples/toy/trade_off.py --quick    # 500 steps: a smoke run
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradops_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # examples/script_support.py
from script_support import progress, scratch_dir  # noqa: E402

HERE = pathlib.Path(__file__).parent
INITIAL_POINTS = ((-0.85, 0.75), (-0.85, -0.3), (0.9, 0.9))
METHODS = {
  "uniform": lambda: gradops_jax.scale_by_linear_scalarization(2, weights=[1.0, 1.0]),
  "PCGrad": lambda: gradops_jax.scale_by_pcgrad(2),
  "MGDA": lambda: gradops_jax.scale_by_mgda(2),
  "CAGrad": lambda: gradops_jax.scale_by_cagrad(2, c=0.5),
  "IMTL-G": lambda: gradops_jax.scale_by_imtl_g(2),
  **{
    f"GradOPS a={alpha:g}": (lambda alpha=alpha: gradops_jax.scale_by_gradops(2, alpha=alpha))
    for alpha in (-3.0, -1.0, 0.0, 1.0, 3.0)
  },
}


def task_losses(theta):
  """``(L_1, L_2)`` of Appendix B at ``theta = (theta_1, theta_2)``."""
  t1, t2 = theta[0], theta[1]
  valley = jnp.tanh(-3.0 * t2)
  f1 = jnp.log(jnp.maximum(jnp.abs(5.0 * (-t1 - 0.7) - valley), 0.0005)) + 1.0
  f2 = jnp.log(jnp.maximum(jnp.abs(5.0 * (-t1 + 0.7) - valley), 0.0005)) + 1.0
  g1 = 1.5 * jnp.tanh(2.0 * (-t1 + 0.7) ** 2) * (t1**2 + 1.0) + (-t2 - 0.8) ** 2 - 2.5
  g2 = 1.5 * jnp.tanh(2.0 * (-t1 - 0.7) ** 2) * (t1**2 + 1.0) + (-t2 - 0.8) ** 2 - 2.5
  c1 = jnp.maximum(jnp.tanh(5.0 * t2), 0.0)
  c2 = jnp.maximum(jnp.tanh(-5.0 * t2), 0.0)
  return jnp.stack([c1 * f1 + c2 * g1, c1 * f2 + c2 * g2])


def trajectories(aggregator, starts, steps, learning_rate=1e-3):
  """Adam on the aggregated task gradients from each start; ``(starts, steps + 1, 2)`` paths.

  The starts are vmapped inside the scanned step (``scan(vmap(step))``): the
  aggregators do their float64 work in a local ``jax.enable_x64`` scope, which
  a ``vmap`` applied around a finished ``scan`` would not see.
  """
  tx = optax.chain(aggregator, optax.adam(learning_rate))

  def one_step(theta, state):
    _, task_grads = gradops_jax.value_and_task_grads(task_losses)(theta)
    updates, state = tx.update(task_grads, state, theta)
    return optax.apply_updates(theta, updates), state

  def step(carry, _):
    thetas, states = jax.vmap(one_step)(*carry)
    return (thetas, states), thetas

  _, path = jax.lax.scan(step, (starts, jax.vmap(tx.init)(starts)), length=steps)
  return jnp.concatenate([starts[None], path]).transpose(1, 0, 2)


def pareto_front(resolution=801):
  """Non-dominated ``(L_1, L_2)`` values over a grid of ``[-1, 1]^2``, sorted by ``L_1``."""
  axis = jnp.linspace(-1.0, 1.0, resolution)
  grid = jnp.stack(jnp.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
  values = np.asarray(jax.jit(jax.vmap(task_losses))(grid), np.float64)
  order = np.lexsort((values[:, 1], values[:, 0]))
  front, best = [], np.inf
  for index in order:
    if values[index, 1] < best:
      front.append(values[index])
      best = values[index, 1]
  return np.asarray(front)


def distance_to_front(point, front):
  """How far a point is from being Pareto optimal: its smallest Chebyshev distance to the front."""
  return float(np.min(np.max(np.abs(front - point), axis=1)))


def run(steps):
  """All methods from all initial points: ``{method: (3, steps + 1, 2) paths}``."""
  paths = {}
  starts = jnp.asarray(INITIAL_POINTS, jnp.float32)
  for name, make in progress(METHODS.items(), desc="methods"):
    paths[name] = np.asarray(jax.jit(trajectories, static_argnums=(0, 2))(make(), starts, steps))
  return paths


def plot(paths, front, out_dir):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  axis = np.linspace(-1.0, 1.0, 300)
  grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
  total = np.asarray(jax.vmap(task_losses)(jnp.asarray(grid))).sum(axis=1).reshape(300, 300)
  names = list(paths)
  columns = 5
  rows = -(-len(names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), sharex=True, sharey=True)
  for ax, name in zip(axes.ravel(), names):
    ax.contourf(axis, axis, total, levels=30, cmap="Greys_r", alpha=0.8)
    for path in paths[name]:
      ax.plot(path[:, 0], path[:, 1], lw=1.5)
      ax.plot(*path[0], "ko", ms=4)
      ax.plot(*path[-1], "r*", ms=9)
    ax.set_title(name, fontsize=10)
  for ax in axes.ravel()[len(names) :]:
    ax.axis("off")
  fig.suptitle(r"Trajectories on the contours of $L_1 + L_2$ (black: start, red: end)")
  fig.tight_layout()
  fig.savefig(out_dir / "trajectories.png", dpi=100)

  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  ax.plot(front[:, 0], front[:, 1], "k-", lw=2, label="Pareto front (grid)")
  markers = "os^"
  for index, name in enumerate(names):
    color = plt.cm.tab10(index % 10)
    for start, path in enumerate(paths[name]):
      values = np.asarray(jax.vmap(task_losses)(jnp.asarray(path[::50])))
      ax.plot(values[:, 0], values[:, 1], color=color, lw=0.6, alpha=0.5)
      ax.plot(*values[-1], markers[start], color=color, ms=7, label=name if start == 0 else None)
  ax.set_xlabel("$L_1$")
  ax.set_ylabel("$L_2$")
  ax.set_title("Objective space (marker: initial point 1, 2, 3 = o, s, ^)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(out_dir / "objective_space.png", dpi=100)
  plt.close("all")


def results_table(paths, front, steps):
  lines = [
    f"# Appendix B toy problem: final points after {steps} Adam steps (lr 1e-3)"
    + ("" if steps >= 20_000 else " (a smoke run: far from converged, not the paper's setting)"),
    "",
    "Command: `python examples/toy/trade_off.py" + ("" if steps == 20_000 else f" --steps {steps}") + "`",
    "",
    "Distance to the Pareto front: the smallest Chebyshev distance in (L1, L2) to the "
    "non-dominated points of an 801 x 801 grid of [-1, 1]^2 (0 = on the front, up to grid resolution).",
    "",
    "| method | start | final theta | (L1, L2) | distance to front |",
    "|---|---|---|---|---|",
  ]
  finals = {}
  for name, method_paths in paths.items():
    for start, path in zip(INITIAL_POINTS, method_paths):
      values = np.asarray(task_losses(jnp.asarray(path[-1])))
      finals[name, start] = values
      lines.append(
        f"| {name} | {start} | ({path[-1][0]:.3f}, {path[-1][1]:.3f}) | "
        f"({values[0]:.3f}, {values[1]:.3f}) | {distance_to_front(values, front):.3f} |"
      )
  return "\n".join(lines) + "\n", finals


def main(steps=20_000, out_dir=None):
  """Runs every method; writes RESULTS.md and the plots to ``out_dir`` (a scratch directory by default)."""
  out_dir = scratch_dir("toy") if out_dir is None else out_dir
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = run(steps)
  front = pareto_front()
  table, finals = results_table(paths, front, steps)
  (out_dir / "RESULTS.md").write_text(table)
  plot(paths, front, out_dir)
  print(table)
  print(f"wrote {out_dir}/RESULTS.md and the plots")
  return paths, finals, front


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20_000)
  parser.add_argument("--quick", action="store_true", help="500 steps")
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help=f"output directory (default: a scratch directory; {HERE} for the committed results)",
  )
  args = parser.parse_args()
  main(500 if args.quick else args.steps, args.out)
