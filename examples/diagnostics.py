"""Watching GradOPS train: task weights, projections and task cosines per step.

A three-task Flax NNX model (shared trunk, one head per task) whose tasks
partly conflict is trained with GradOPS on the shared trunk
(``aggregate_shared``) and Adam. After every step a callback reads the
:class:`gradops_jax.GradOPSState` out of the optimiser state and logs the
alpha-weights, which tasks were projected and the trunk's task cosine matrix;
at the end it plots them::

    python examples/diagnostics.py --steps 400 --alpha -1 --out examples/diagnostics.png
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradops_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # examples/script_support.py
from script_support import progress, scratch_dir  # noqa: E402

NUM_TASKS = 3


class ThreeHeads(nnx.Module):
  def __init__(self, rngs):
    self.trunk1 = nnx.Linear(8, 64, rngs=rngs)
    self.trunk2 = nnx.Linear(64, 64, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(64, 1, rngs=rngs) for _ in range(NUM_TASKS)])

  def __call__(self, x):
    hidden = nnx.relu(self.trunk2(nnx.relu(self.trunk1(x))))
    return jnp.concatenate([head(hidden) for head in self.heads], axis=-1)


def make_data(key, n=1024):
  """Three regression targets; the second is partly the negative of the first."""
  x = jax.random.normal(key, (n, 8))
  base = jnp.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]
  targets = jnp.stack([base, -0.7 * base + jnp.cos(x[:, 3]), 3.0 * jnp.tanh(x[:, 4] - x[:, 5])], axis=-1)
  return x, targets


def is_shared(path):
  return not any(getattr(key, "key", None) == "heads" for key in path)


class DiagnosticsLog:
  """A per-step callback: ``log(step, losses, opt_state)`` keeps the GradOPS diagnostics."""

  def __init__(self):
    self.steps, self.losses, self.weights, self.projected, self.cosine = [], [], [], [], []
    self.fallbacks = 0

  def __call__(self, step, losses, opt_state):
    # optax.tree.get finds the one GradOPSState field of each name in the nested state.
    self.steps.append(step)
    self.losses.append(np.asarray(losses))
    self.weights.append(np.asarray(optax.tree.get(opt_state, "alpha_weights")))
    self.projected.append(np.asarray(optax.tree.get(opt_state, "projected")))
    self.cosine.append(np.asarray(optax.tree.get(opt_state, "cosine")))
    self.fallbacks = int(np.asarray(optax.tree.get(opt_state, "fallback_count")))

  def arrays(self):
    return {name: np.stack(getattr(self, name)) for name in ("losses", "weights", "projected", "cosine")} | {
      "steps": np.asarray(self.steps)
    }

  def plot(self, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = self.arrays()
    fig, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True)
    for task in range(data["weights"].shape[1]):
      axes[0].semilogy(data["steps"], data["losses"][:, task], label=f"task {task + 1}")
      axes[1].plot(data["steps"], data["weights"][:, task], label=f"task {task + 1}")
    axes[0].set_ylabel("task loss")
    axes[1].set_ylabel("GradOPS weight $w_i$")
    axes[2].imshow(
      data["projected"].T,
      aspect="auto",
      interpolation="nearest",
      cmap="Greys",
      extent=(data["steps"][0], data["steps"][-1], data["projected"].shape[1] + 0.5, 0.5),
    )
    axes[2].set_ylabel("projected (black)")
    axes[2].set_yticks(range(1, data["projected"].shape[1] + 1))
    for i, j in zip(*np.triu_indices(data["cosine"].shape[1], k=1)):
      axes[3].plot(data["steps"], data["cosine"][:, i, j], label=f"cos(g{i + 1}, g{j + 1})")
    axes[3].axhline(0.0, color="grey", lw=0.5)
    axes[3].set_ylabel("trunk cosine")
    axes[3].set_xlabel("step")
    for ax in (axes[0], axes[1], axes[3]):
      ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("GradOPS diagnostics, read from the optimiser state each step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(steps=400, alpha=-1.0, out=None, seed=0):
  model = ThreeHeads(nnx.Rngs(seed))
  shared = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: is_shared(path), tree)
  tx = optax.chain(
    gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(NUM_TASKS, alpha=alpha), NUM_TASKS, shared),
    optax.adam(3e-3),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = make_data(jax.random.key(seed + 1))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def task_losses(model):
      return jnp.mean((model(x) - y) ** 2, axis=0)

    losses, task_grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model)
    optimizer.update(model, task_grads)
    return losses

  log = DiagnosticsLog()
  for step in progress(range(steps), desc="GradOPS"):
    losses = train_step(model, optimizer, x, y)
    log(step, losses, optimizer.opt_state)
  data = log.arrays()
  print(f"task losses: first {np.round(data['losses'][0], 4)}, last {np.round(data['losses'][-1], 4)}")
  print(
    f"steps with a projection: {int(data['projected'].any(axis=1).sum())}/{steps}; "
    f"MGDA fallbacks: {log.fallbacks}; last weights: {np.round(data['weights'][-1], 3)}"
  )
  if out is not None:
    log.plot(out)
    print(f"wrote {out}")
  return log


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--alpha", type=float, default=-1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help="the plot (default: a scratch directory; examples/diagnostics.png is the committed one)",
  )
  args = parser.parse_args()
  main(args.steps, args.alpha, args.out or scratch_dir("diagnostics") / "diagnostics.png", args.seed)
