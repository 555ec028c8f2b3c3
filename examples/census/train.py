"""Census-Income (the GradOPS paper's Table 1): every method, several seeds, test AUC.

    python examples/census/train.py                       # the paper's 200 epochs, 5 seeds
    python examples/census/train.py --quick               # a smoke run: 4,000 rows, 2 epochs, 1 seed

Results go to a scratch directory unless ``--out`` names a file (RESULTS.md
beside this script says which command wrote it).
    python examples/census/train.py --sweep --epochs 3 --seeds 2  # Appendix C: alpha sweep, weight traces

Model, as Section 4.1 of the paper reads to us: a shared trunk of two fully
connected ReLU layers of 192 units, one dropout layer (p = 0.3) after it, and
one linear logit per task; sigmoid cross-entropy per task; Adam, learning rate
1e-4, batch 1024. The aggregators act on the trunk only (``aggregate_shared``):
each head gets its own task's gradient, as in the papers, which deconflict the
shared parameters. "Single-task" trains one such network per task. For each
run, the test AUCs are taken at the epoch with the best average validation
AUC. The table reports the mean and a 95% t-interval over seeds, the
average AUC, Delta_m% against single-task and the Mean Rank (MR), as the
paper defines them (Section 4, "Evaluation").
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import stats

import gradops_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # examples/script_support.py
from script_support import progress, scratch_dir  # noqa: E402

if __package__ in (None, ""):
  import data as census_data  # run as a script
else:
  from . import data as census_data

HERE = pathlib.Path(__file__).parent
NUM_TASKS = 3
PAPER_TABLE_1 = {  # Income, Marital, Education, Average, Delta_m%, MR (Zhu et al., WSDM 2025, Table 1)
  "Single-task": (0.9454, 0.9817, 0.8875, 0.9382, 0.00, 4.33),
  "Uniform scaling": (0.9407, 0.9763, 0.8829, 0.9333, 0.52, 14.00),
  "PCGrad": (0.9428, 0.9812, 0.8856, 0.9365, 0.18, 11.67),
  "GradVac": (0.9436, 0.9798, 0.8856, 0.9363, 0.20, 10.67),
  "MGDA": (0.9460, 0.9833, 0.8870, 0.9388, -0.06, 3.00),
  "CAGrad": (0.9444, 0.9820, 0.8863, 0.9376, 0.07, 7.00),
  "IMTL-G": (0.9443, 0.9826, 0.8864, 0.9378, 0.05, 6.33),
  "GradOPS(a=0)": (0.9436, 0.9817, 0.8861, 0.9371, 0.12, 9.33),
  "GradOPS(a=2)": (0.9432, 0.9769, 0.8864, 0.9355, 0.28, 10.67),
  "GradOPS(a=-1)": (0.9443, 0.9832, 0.8866, 0.9380, 0.02, 5.67),
  "GradOPS(a=-2)": (0.9453, 0.9837, 0.8871, 0.9387, -0.05, 3.33),
  "GradOPS(a=-3)": (0.9459, 0.9854, 0.8876, 0.9396, -0.15, 1.33),
}
AGGREGATORS = {
  "Uniform scaling": lambda: gradops_jax.scale_by_linear_scalarization(NUM_TASKS, [1.0] * NUM_TASKS),
  "PCGrad": lambda: gradops_jax.scale_by_pcgrad(NUM_TASKS),
  "GradVac": lambda: gradops_jax.scale_by_gradvac(NUM_TASKS),
  "MGDA": lambda: gradops_jax.scale_by_mgda(NUM_TASKS),
  "CAGrad": lambda: gradops_jax.scale_by_cagrad(NUM_TASKS, c=0.5),
  "IMTL-G": lambda: gradops_jax.scale_by_imtl_g(NUM_TASKS),
  **{
    f"GradOPS(a={alpha:g})": (lambda alpha=alpha: gradops_jax.scale_by_gradops(NUM_TASKS, alpha=alpha))
    for alpha in (0.0, 2.0, -1.0, -2.0, -3.0)
  },
}
METHODS = ("Single-task", *AGGREGATORS)


class CensusNet(nnx.Module):
  """Shared 2 x 192 ReLU trunk, dropout 0.3, one logit per task."""

  def __init__(self, num_features, num_heads, rngs):
    self.trunk1 = nnx.Linear(num_features, 192, rngs=rngs)
    self.trunk2 = nnx.Linear(192, 192, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(192, 1, rngs=rngs) for _ in range(num_heads)])

  def __call__(self, x):
    hidden = self.dropout(nnx.relu(self.trunk2(nnx.relu(self.trunk1(x)))))
    return jnp.concatenate([head(hidden) for head in self.heads], axis=-1)


def is_shared(path):
  return not any(getattr(key, "key", None) == "heads" for key in path)


def task_losses(model, x, y):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(model(x), y), axis=0)


def auc(labels, scores):
  """Area under the ROC curve (Mann-Whitney U with tied scores averaged)."""
  positives = labels > 0.5
  num_pos, num_neg = int(positives.sum()), int((~positives).sum())
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  ranks = stats.rankdata(scores)
  return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def make_optimizer(model, aggregator, num_heads, shared=None):
  """Adam on the aggregated gradients; ``shared`` (default: all but the heads)
  as in :func:`gradops_jax.aggregate_shared`."""
  if shared is None:
    shared = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: is_shared(path), tree)
  tx = optax.chain(gradops_jax.aggregate_shared(aggregator, num_heads, shared), optax.adam(1e-4))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
  losses, task_grads = gradops_jax.nnx_value_and_task_grads(task_losses)(model, x, y)
  optimizer.update(model, task_grads)
  return losses


@nnx.jit
def predict(model, x):
  return model(x)


def evaluate(model, split, tasks):
  model.eval()
  logits = np.concatenate(
    [np.asarray(predict(model, jnp.asarray(split.features[i : i + 8192]))) for i in range(0, len(split.features), 8192)]
  )
  model.train()
  return [auc(split.labels[:, task], logits[:, k]) for k, task in enumerate(tasks)]


def fit(model, optimizer, splits, tasks, epochs, seed, batch=1024, after_step=None):
  """Trains ``model`` on ``tasks``; returns the ``(epochs, len(tasks))`` validation and test AUCs.

  ``after_step(optimizer)``, if given, is called after every step.
  """
  train, validation, test = splits
  rng = np.random.default_rng(seed)
  features, labels = train.features, train.labels[:, tasks]
  valid, held_out = [], []
  for _ in range(epochs):
    order = rng.permutation(len(features))
    for start in range(0, len(order) - batch + 1, batch):  # full batches only: one compilation
      index = order[start : start + batch]
      train_step(model, optimizer, jnp.asarray(features[index]), jnp.asarray(labels[index]))
      if after_step is not None:
        after_step(optimizer)
    valid.append(evaluate(model, validation, tasks))
    held_out.append(evaluate(model, test, tasks))
  return np.asarray(valid), np.asarray(held_out)


def at_best_epoch(valid, held_out):
  """Test AUCs at the epoch of best *average* validation AUC, the one rule for every method.

  ``valid`` and ``held_out`` are ``(epochs, tasks)``; the single-task baseline
  stacks its per-task networks' columns, so it picks one epoch for all tasks
  as the multi-task methods do (picking each task's own best epoch would hand
  it a per-task oracle).
  """
  return list(held_out[int(np.argmax(np.mean(valid, axis=1)))])


def train_run(train, validation, test, aggregator, tasks, epochs, seed, batch=1024, weights_trace=None):
  """One network on ``tasks``; its per-epoch validation and test AUCs (see :func:`fit`).

  With a list as ``weights_trace``, appends the aggregator's last weights
  (the α-weights ``GradOPSState.alpha_weights``) after every step.
  """
  model = CensusNet(train.features.shape[1], len(tasks), nnx.Rngs(seed, dropout=seed + 1))
  optimizer = make_optimizer(model, aggregator, len(tasks))
  trace = None
  if weights_trace is not None:
    trace = lambda optimizer: weights_trace.append(np.asarray(optax.tree.get(optimizer.opt_state, "alpha_weights")))
  return fit(model, optimizer, (train, validation, test), tasks, epochs, seed, batch, trace)


def run_method(name, splits, epochs, seed):
  """Test AUCs (Income, Marital, Education) of one method and seed."""
  if name == "Single-task":
    single_task = lambda: gradops_jax.scale_by_linear_scalarization(1, [1.0])  # the plain gradient
    runs = [train_run(*splits, single_task(), [task], epochs, seed) for task in range(NUM_TASKS)]
    return at_best_epoch(*(np.concatenate(columns, axis=1) for columns in zip(*runs)))
  return at_best_epoch(*train_run(*splits, AGGREGATORS[name](), list(range(NUM_TASKS)), epochs, seed))


def summarise(results):
  """Per method: mean and 95% t-half-width per task, average AUC, Delta_m%, MR."""
  names = list(results)
  means = {name: np.mean(results[name], axis=0) for name in names}
  ranks = stats.rankdata([-means[name] for name in names], axis=0)  # 1 = best, per task
  single = means.get("Single-task")
  rows = {}
  for index, name in enumerate(names):
    scores = np.asarray(results[name])
    seeds = len(scores)
    half = (
      stats.t.ppf(0.975, seeds - 1) * scores.std(axis=0, ddof=1) / np.sqrt(seeds)
      if seeds > 1
      else np.full(NUM_TASKS, np.nan)
    )
    delta = float(-100 * np.mean((means[name] - single) / single)) + 0.0 if single is not None else np.nan
    rows[name] = dict(
      mean=means[name],
      half=half,
      average=float(means[name].mean()),
      delta_m=delta,
      mean_rank=float(ranks[index].mean()),
      seeds=seeds,
    )
  return rows


def markdown(rows, epochs, seeds, wall, command, quick):
  lines = [
    "# Census-Income, Table 1 of the GradOPS paper: our run beside the paper's",
    "",
    f"Command: `{command}`  ",
    f"Wall time: {wall / 60:.1f} min on 2 CPU cores.  ",
    f"Ran: **{epochs} epoch(s)** (the paper: 200) and **{seeds} seed(s)** (the paper: 10)"
    + (", on 4,000 training rows (`--quick`)" if quick else "")
    + ".",
    "",
    "Test AUC at the best validation epoch, mean ± 95% t-interval over seeds. "
    "Delta_m% is the mean relative AUC drop against single-task (lower is better); MR is "
    "the mean over tasks of each method's rank among the methods of this table.",
    "",
    "| method | Income | Marital | Education | Average | Delta_m% | MR | paper: Income, Marital, Education, Average, Delta_m%, MR |",
    "|---|---|---|---|---|---|---|---|",
  ]
  if quick:
    lines.insert(1, "\n**A smoke run (`--quick`): too short to compare methods; the AUCs mean nothing.**")
  for name, row in rows.items():
    cells = [f"{m:.4f} ± {h:.4f}" if np.isfinite(h) else f"{m:.4f} (1 seed)" for m, h in zip(row["mean"], row["half"])]
    paper = PAPER_TABLE_1.get(name)
    paper_text = ", ".join(f"{v:g}" for v in paper) if paper else ""
    lines.append(
      f"| {name} | {' | '.join(cells)} | {row['average']:.4f} | {row['delta_m']:.2f} | "
      f"{row['mean_rank']:.2f} | {paper_text} |"
    )
  return "\n".join(lines) + "\n"


def alpha_sweep(splits, alphas, epochs, seeds):
  """Test AUC gains of GradOPS over uniform scaling for each alpha (Appendix C.2).

  Returns ``(alphas, gains)`` with ``gains`` of shape ``(len(alphas), 4)``:
  Income, Marital, Education and their average, means over seeds.
  """
  uniform = np.mean([run_method("Uniform scaling", splits, epochs, seed) for seed in range(seeds)], axis=0)
  gains = []
  for alpha in progress(alphas, desc="alpha"):
    scores = np.mean(
      [
        at_best_epoch(
          *train_run(
            *splits, gradops_jax.scale_by_gradops(NUM_TASKS, alpha=float(alpha)), list(range(NUM_TASKS)), epochs, seed
          )
        )
        for seed in range(seeds)
      ],
      axis=0,
    )
    gains.append(np.append(scores - uniform, np.mean(scores - uniform)))
  return np.asarray(alphas, np.float64), np.asarray(gains)


def weight_traces(splits, alphas, epochs, seed=0):
  """``{alpha: (steps, 3) GradOPS weights after every step}`` (Appendix C, Figure 7)."""
  traces = {}
  for alpha in alphas:
    trace = []
    train_run(
      *splits,
      gradops_jax.scale_by_gradops(NUM_TASKS, alpha=alpha),
      list(range(NUM_TASKS)),
      epochs,
      seed,
      weights_trace=trace,
    )
    traces[alpha] = np.stack(trace)
  return traces


def plot_sweep(alphas, gains, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharex=True)
  for ax, column, title in zip(axes, range(4), (*census_data.TASKS, "Average")):
    ax.bar(alphas, 100 * gains[:, column], width=0.8, color=np.where(gains[:, column] >= 0, "tab:green", "tab:red"))
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_title(title)
    ax.set_xlabel("alpha")
  axes[0].set_ylabel("test AUC gain over uniform (x 1e-2)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_traces(traces, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [alpha for alpha in (1.0, -1.0, 3.0, -3.0) if alpha in traces]
  fig, axes = plt.subplots(len(rows), NUM_TASKS, figsize=(12, 2.6 * len(rows)), sharex=True, squeeze=False)
  for row, alpha in enumerate(rows):
    for task in range(NUM_TASKS):
      ax = axes[row, task]
      for shown, style in ((alpha, "-"), (0.0, "--")):
        if shown in traces:
          ax.plot(traces[shown][:, task], style, lw=0.8, label=f"alpha = {shown:g}")
      ax.set_title(f"{census_data.TASKS[task]} weight $w_i$")
      ax.legend(fontsize=7)
  for ax in axes[-1]:
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def sweep_markdown(alphas, gains, epochs, seeds, command):
  lines = [
    "# Census-Income, Appendix C.2: test AUC gain of GradOPS over uniform scaling",
    "",
    f"Command: `{command}`  ",
    f"Ran: **{epochs} epoch(s)** (the paper: 200) and **{seeds} seed(s)** per alpha.",
    "",
    "| alpha | Income | Marital | Education | Average |",
    "|---|---|---|---|---|",
  ]
  lines += [f"| {a:g} | " + " | ".join(f"{g:+.4f}" for g in row) + " |" for a, row in zip(alphas, gains)]
  return "\n".join(lines) + "\n"


def main(epochs=200, seeds=5, methods=METHODS, quick=False, out=None, cache_dir=None):
  start = time.perf_counter()
  out = scratch_dir("census") / "RESULTS.md" if out is None else out
  splits = census_data.load(cache_dir or census_data.DEFAULT_CACHE)
  if quick:
    splits = tuple(census_data.Split(s.features[:4000], s.labels[:4000]) for s in splits)
  results = {name: [] for name in methods}
  for name in progress(methods, desc="methods"):
    for seed in range(seeds):
      results[name].append(run_method(name, splits, epochs, seed))
  rows = summarise(results)
  command = f"python examples/census/train.py --epochs {epochs} --seeds {seeds}" + (" --quick" if quick else "")
  if tuple(methods) != METHODS:
    command += " --methods " + " ".join(f"'{name}'" for name in methods)
  if pathlib.Path(out).resolve() != (HERE / "RESULTS.md").resolve():
    command += f" --out {out}"
  table = markdown(rows, epochs, seeds, time.perf_counter() - start, command, quick)
  pathlib.Path(out).write_text(table)
  print(table)
  print(f"wrote {out}")
  return rows


def main_sweep(epochs, seeds, out_dir=None, cache_dir=None):
  """Appendix C: the alpha sweep (Figure 8) and the weight traces (Figure 7)."""
  out_dir = scratch_dir("census") if out_dir is None else pathlib.Path(out_dir)
  splits = census_data.load(cache_dir or census_data.DEFAULT_CACHE)
  alphas, gains = alpha_sweep(splits, np.arange(-10, 11), epochs, seeds)
  command = f"python examples/census/train.py --sweep --epochs {epochs} --seeds {seeds}"
  table = sweep_markdown(alphas, gains, epochs, seeds, command)
  (out_dir / "ALPHA_SWEEP.md").write_text(table)
  plot_sweep(alphas, gains, out_dir / "alpha_sweep.png")
  plot_traces(weight_traces(splits, (1.0, 0.0, -1.0, 3.0, -3.0), epochs), out_dir / "weight_traces.png")
  print(table)
  return alphas, gains


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=200)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--quick", action="store_true", help="4,000 rows, 2 epochs, 1 seed")
  parser.add_argument(
    "--sweep", action="store_true", help="Appendix C instead: alpha from -10 to 10 against uniform, and weight traces"
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help=f"the table (default: a scratch directory; {HERE / 'RESULTS.md'} for the committed one); "
    "with --sweep, the directory",
  )
  args = parser.parse_args()
  if args.quick:
    args.epochs, args.seeds = 2, 1
  if args.sweep:
    main_sweep(args.epochs, args.seeds, args.out)
  else:
    main(args.epochs, args.seeds, args.methods, args.quick, args.out)
