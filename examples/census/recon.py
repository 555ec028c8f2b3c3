"""Recon on Census-Income: score the shared layers, branch the worst, retrain with GradOPS.

    python examples/census/recon.py            # 10 epochs, 3 seeds: what RECON.md reports
    python examples/census/recon.py --quick    # a smoke run: 4,000 rows, 1 + 2 epochs, 1 seed

The Recon procedure (Shi et al., ICLR 2023) with ``gradops_jax.recon``, on the
network of ``train.py`` (shared trunk ``trunk1``, ``trunk2``; one head per task):

1. Warm-up: train the shared network for ``--warmup-epochs`` with GradOPS while
   ``layer_conflict_scores`` (S = ``--threshold``), chained in front of the
   aggregator on the shared leaves, counts the conflicting task pairs per layer.
2. Select the ``--k`` layers with the highest scores (``select_layers``).
3. From the same initialisation, train for ``--epochs`` (a) the shared network
   and (b) the network with the selected layers made task-specific
   (``branch_layers``; task 0 keeps the original, tasks 1 and 2 get copies),
   both with GradOPS (alpha = ``--alpha``) on the shared parameters and Adam,
   still scoring the layers that stay shared.

Reported: the selected layers and the parameter increase; the test AUCs at the
best validation epoch (mean and 95% t-interval over seeds); and, Recon's main
empirical claim, the occurrence of conflicting gradients (the fraction of
steps and task pairs with cosine below S) in the layers that stay shared, in
the shared network and in the branched one.
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from scipy import stats

import gradops_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # examples/script_support.py
from script_support import progress, scratch_dir  # noqa: E402
from gradops_jax import recon

if __package__ in (None, ""):
  import data as census_data  # run as a script
  import train as census
else:
  from . import data as census_data
  from . import train as census

HERE = pathlib.Path(__file__).parent
TASKS = ["Income", "Marital", "Education"]
NUM_TASKS = len(TASKS)


def shared_layer_name(path):
  """Layer names of the shared network, also inside a branched one ("model/trunk1" -> "trunk1")."""
  if path and getattr(path[0], "key", None) == "model":
    path = path[1:]
  return recon.default_layer_name(path)


def scored_gradops(alpha, threshold):
  """GradOPS, with the layer conflict scores chained in front of it."""
  return optax.chain(
    recon.layer_conflict_scores(NUM_TASKS, threshold, shared_layer_name),
    gradops_jax.scale_by_gradops(NUM_TASKS, alpha=alpha),
  )


def is_head(path):
  return "heads" in jax.tree_util.keystr(path)


def occurrence(optimizer):
  """Per scored layer: the fraction of (step, task pair) with cosine below S."""
  state = recon.find_conflict_state(optimizer.opt_state)
  pairs = int(np.asarray(state.num_steps)) * NUM_TASKS * (NUM_TASKS - 1) // 2
  return {name: int(np.asarray(count)) / pairs for name, count in state.counts.items()}


def run_seed(splits, seed, epochs, warmup_epochs, k, alpha, threshold):
  num_features = splits[0].features.shape[1]
  tasks = list(range(NUM_TASKS))
  new_model = lambda: census.CensusNet(num_features, NUM_TASKS, nnx.Rngs(seed, dropout=seed + 1))

  warmup = new_model()
  optimizer = census.make_optimizer(warmup, scored_gradops(alpha, threshold), NUM_TASKS)
  census.fit(warmup, optimizer, splits, tasks, warmup_epochs, seed)
  scores = recon.select_layers(optimizer.opt_state, k=k)
  selected = [name for name, _ in scores]

  shared = new_model()
  optimizer = census.make_optimizer(shared, scored_gradops(alpha, threshold), NUM_TASKS)
  shared_auc = census.at_best_epoch(*census.fit(shared, optimizer, splits, tasks, epochs, seed))
  shared_occurrence = occurrence(optimizer)

  branched, added = recon.branch_layers(new_model(), selected, NUM_TASKS, output_axis=-1)
  mask = recon.shared_mask(branched, task_specific=is_head)
  optimizer = census.make_optimizer(branched, scored_gradops(alpha, threshold), NUM_TASKS, shared=mask)
  branched_auc = census.at_best_epoch(*census.fit(branched, optimizer, splits, tasks, epochs, seed))
  branched_occurrence = occurrence(optimizer)
  return {
    "scores": scores,
    "selected": selected,
    "added": added,
    "num_params": sum(leaf.size for leaf in jax.tree.leaves(nnx.state(shared, nnx.Param))),
    "auc": {"GradOPS": shared_auc, "GradOPS + Recon": branched_auc},
    "occurrence": {"GradOPS": shared_occurrence, "GradOPS + Recon": branched_occurrence},
  }


def _mean_and_half_width(values):
  values = np.asarray(values, dtype=float)
  if len(values) < 2:
    return values.mean(axis=0), np.full(values.shape[1:], np.nan)
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(axis=0, ddof=1) / np.sqrt(len(values))
  return values.mean(axis=0), half


def markdown(runs, args, wall, command):
  lines = [
    "# Recon on Census-Income, with GradOPS\n"
    + ("\n**A smoke run (`--quick`): too short to compare methods; the AUCs mean nothing.**\n" if args.quick else ""),
    f"Command: `{command}`  ",
    f"Wall time: {wall / 60:.1f} min on {jax.device_count()} CPU device(s) ({jax.devices()[0].platform}).  ",
    f"Ran: **{args.warmup_epochs} warm-up epoch(s)** of scoring, then **{args.epochs} epoch(s)** per model, "
    f"**{len(runs)} seed(s)**; GradOPS alpha = {args.alpha:g}, S = {args.threshold:g}, k = {args.k}.\n",
    "## Selection (warm-up S-conflict scores of the shared layers)\n",
    "| seed | scores | selected | parameters added (of the shared network's) |",
    "|---|---|---|---|",
  ]
  for seed, run in enumerate(runs):
    scores = ", ".join(f"{name}: {score}" for name, score in run["scores"])
    lines.append(
      f"| {seed} | {scores} | {', '.join(run['selected'])} | "
      f"{run['added']:,} ({100 * run['added'] / run['num_params']:.1f}% of {run['num_params']:,}) |"
    )
  lines += [
    "\n## Test AUC at the best validation epoch (mean ± 95% t-interval over seeds)\n",
    "| method | " + " | ".join(TASKS) + " | Average |",
    "|---|" + "---|" * (NUM_TASKS + 1),
  ]
  for method in ("GradOPS", "GradOPS + Recon"):
    mean, half = _mean_and_half_width([run["auc"][method] for run in runs])
    cells = [f"{m:.4f} ± {h:.4f}" if np.isfinite(h) else f"{m:.4f} (1 seed)" for m, h in zip(mean, half)]
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean.mean():.4f} |")
  remaining = sorted(set.intersection(*[set(run["occurrence"]["GradOPS + Recon"]) for run in runs]))
  lines += [
    "\n## Occurrence of conflicting gradients in the layers that stay shared\n",
    f"Fraction of (training step, task pair) whose gradient cosine on the layer is below S = "
    f"{args.threshold:g}, over the {args.epochs} training epoch(s), mean over seeds.\n",
    "| layer | GradOPS (shared network) | GradOPS + Recon (branched network) |",
    "|---|---|---|",
  ]
  for layer in remaining:
    before = np.mean([run["occurrence"]["GradOPS"][layer] for run in runs])
    after = np.mean([run["occurrence"]["GradOPS + Recon"][layer] for run in runs])
    lines.append(f"| {layer} | {before:.3f} | {after:.3f} |")
  return "\n".join(lines) + "\n"


def main(args, splits=None):
  start = time.perf_counter()
  if splits is None:
    splits = census_data.load(census_data.DEFAULT_CACHE)
  if args.quick:
    splits = tuple(census_data.Split(s.features[:4000], s.labels[:4000]) for s in splits)
  runs = [
    run_seed(splits, seed, args.epochs, args.warmup_epochs, args.k, args.alpha, args.threshold)
    for seed in progress(range(args.seeds), desc="seeds")
  ]
  command = (
    f"python examples/census/recon.py --epochs {args.epochs} --warmup-epochs {args.warmup_epochs} "
    f"--seeds {args.seeds} --k {args.k} --alpha {args.alpha:g} --threshold {args.threshold:g}"
    + (" --quick" if args.quick else "")
  )
  table = markdown(runs, args, time.perf_counter() - start, command)
  out = scratch_dir("census") / "RECON.md" if args.out is None else args.out
  pathlib.Path(out).write_text(table)
  print(table)
  print(f"wrote {out}")
  return runs


def parser():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--warmup-epochs", type=int, default=2)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--k", type=int, default=1, help="number of shared layers to branch")
  p.add_argument("--alpha", type=float, default=-3.0, help="GradOPS alpha (the paper's best: -3)")
  p.add_argument("--threshold", type=float, default=0.0, help="Recon's S")
  p.add_argument("--quick", action="store_true", help="4,000 rows, 1 + 2 epochs, 1 seed")
  p.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help=f"default: a scratch directory; {HERE / 'RECON.md'} for the committed one",
  )
  return p


if __name__ == "__main__":
  arguments = parser().parse_args()
  if arguments.quick:
    arguments.warmup_epochs, arguments.epochs, arguments.seeds = 1, 2, 1
  main(arguments)
