"""Many tasks: every method's update and compile time for T up to 256, next to torchjd's.

    python -m benchmarks.many_tasks --quick   # about 10 minutes on 2 CPU cores, with torchjd
    python -m benchmarks.many_tasks --tiny    # seconds; what the smoke test runs

Two tables. **Solves:** for T in {16, 32, 64, 128, 256} and D in {10, 1000,
1e5} (T > D is the rank-deficient regime of instance-wise risk minimisation),
the jitted update of every registered method on one ``(T, D)`` float32 leaf
of standard normal entries, after compilation, its compile time (lowering
and compiling a fresh ``jax.jit``), and torchjd's aggregator on the same
matrix where it has the method; ours and theirs take turns call by call
(:func:`paired_times`). A peer whose first call takes longer
than ``PEER_BUDGET_S`` is timed by that call alone. **Gram pass:** GradOPS
against the one-pass floor (a jitted weighted sum) on one leaf of D = 1e6 and
4e6, T = 8 to 64, with torchjd's UPGrad. ``run.py`` includes this section;
torchjd rows need torch and torchjd installed (see ``benchmarks/README.md``).
"""

import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

import gradops_jax
from benchmarks.run import aggregator_step
from benchmarks.run import cpu_model
from benchmarks.run import floor_step
from benchmarks.run import median_times
from benchmarks.run import method_transforms
from benchmarks.run import mode_parser
from benchmarks.run import params_like
from benchmarks.run import stacked_tree
from benchmarks.run import torchjd_aggregators

RESULTS = pathlib.Path(__file__).parent / "results"
PEER_BUDGET_S = 20.0
MODES = {
  "tiny": dict(tasks=[16], dims=[10], gram_tasks=[8], gram_dims=[1e4], repeats=2),
  "quick": dict(
    tasks=[16, 32, 64, 128, 256], dims=[10, 1000, 1e5], gram_tasks=[8, 16, 32, 64], gram_dims=[1e6, 4e6], repeats=3
  ),
  "full": dict(
    tasks=[16, 32, 64, 128, 256], dims=[10, 1000, 1e5], gram_tasks=[8, 16, 32, 64], gram_dims=[1e6, 4e6], repeats=7
  ),
}


def torchjd_peers(num_tasks):
  """torchjd's aggregators under our method names, or None without torch and torchjd."""
  torch, peers = torchjd_aggregators()  # PCGrad, UPGrad, MGDA and Mean
  if peers is None:
    return None, None
  from torchjd import aggregation

  peers.update(
    {
      "IMTL-G": aggregation.IMTLG(),
      "Aligned-MTL": aggregation.AlignedMTL(),
      "CAGrad": aggregation.CAGrad(c=0.5),  # our default c
      "Nash-MTL": aggregation.NashMTL(n_tasks=num_tasks),
      "GradVac": aggregation.GradVac(beta=1e-2),  # our default beta
    }
  )
  return torch, peers


def compile_seconds(tx, tree):
  """Wall time of lowering and compiling a fresh ``jax.jit`` of one update."""
  params = params_like(tree)
  state = tx.init(params)
  start = time.perf_counter()
  jax.jit(lambda grads: tx.update(grads, state, params)[0]).lower(tree).compile()
  return time.perf_counter() - start


def within_budget(calls):
  """Splits ``calls`` into those whose first call is within PEER_BUDGET_S and the times of the others."""
  kept, slow = {}, {}
  for name, (fn, args) in calls.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    elapsed = time.perf_counter() - start
    if elapsed > PEER_BUDGET_S:
      slow[name] = elapsed
    else:
      kept[name] = (fn, args)
  return kept, slow


def paired_times(calls, repeats, seconds=1.0):
  """:func:`benchmarks.run.median_times` of a method and its peer, side by side, for about ``seconds``.

  Rounds are capped by the slower call, so that a peer 1000 times slower
  than a 0.1 ms update is not called 1000 times.
  """
  first = {}
  for name, (fn, args) in calls.items():
    jax.block_until_ready(fn(*args))  # compiles, warms up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first[name] = time.perf_counter() - start
  max_rounds = int(min(1000, max(repeats, seconds / max(max(first.values()), 1e-9))))
  return median_times(calls, repeats, min_seconds=seconds / 4, max_rounds=max_rounds, warm_up=False)


def bench_solves(tasks, dims, repeats, progress=print):
  rows = []
  for num_tasks in tasks:
    for dim in dims:
      tree = stacked_tree(num_tasks, [(int(dim),)])
      transforms = method_transforms(num_tasks)
      calls = {name: (aggregator_step(tx, params_like(tree)), (tree,)) for name, tx in transforms.items()}
      torch, peers = torchjd_peers(num_tasks)
      peer_calls = {}
      if peers is not None:
        matrix = torch.from_numpy(np.array(tree["leaf000"]))
        peer_calls = {name: (aggregator, (matrix,)) for name, aggregator in peers.items()}
      peer_calls, slow_peers = within_budget(peer_calls)
      for name, tx in transforms.items():
        pair = {name: calls[name]}
        if name in peer_calls:
          pair["torchjd"] = peer_calls[name]
        times = paired_times(pair, repeats)
        row = {"method": name, "T": num_tasks, "D": int(dim), "ours_ms": 1e3 * times[name]}
        row["compile_s"] = compile_seconds(tx, tree)
        if name in peer_calls:
          row["torchjd_ms"] = 1e3 * times["torchjd"]
        elif name in slow_peers:
          row["torchjd_ms"] = 1e3 * slow_peers[name]
          row["torchjd_single_call"] = True
        if "torchjd_ms" in row:
          row["peer_ratio"] = row["ours_ms"] / row["torchjd_ms"]
        rows.append(row)
      progress(f"solves T={num_tasks} D={int(dim)} done")
  return rows


def bench_gram_pass(tasks, dims, repeats, progress=print):
  rows = []
  for dim in dims:
    for num_tasks in tasks:
      tree = stacked_tree(num_tasks, [(int(dim),)])
      calls = {
        "floor": (floor_step(num_tasks), (tree,)),
        "GradOPS": (aggregator_step(gradops_jax.scale_by_gradops(num_tasks), params_like(tree)), (tree,)),
      }
      torch, peers = torchjd_peers(num_tasks)
      if peers is not None:
        calls["torchjd UPGrad"] = (peers["UPGrad"], (torch.from_numpy(np.array(tree["leaf000"])),))
      times = median_times(calls, repeats)
      row = {"T": num_tasks, "D": int(dim), "gradops_ms": 1e3 * times["GradOPS"], "floor_ms": 1e3 * times["floor"]}
      row["floor_ratio"] = times["GradOPS"] / times["floor"]
      if "torchjd UPGrad" in times:
        row["torchjd_upgrad_ms"] = 1e3 * times["torchjd UPGrad"]
      rows.append(row)
      progress(f"gram pass T={num_tasks} D={int(dim)} done")
      del tree
  return rows


def run(mode, progress=print):
  m = MODES[mode]
  return {
    "solves": bench_solves(m["tasks"], m["dims"], m["repeats"], progress),
    "gram_pass": bench_gram_pass(m["gram_tasks"], m["gram_dims"], m["repeats"], progress),
  }


def _ms(value):
  return "" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def markdown(results):
  solves, gram_pass = results["solves"], results["gram_pass"]
  methods = list(dict.fromkeys(row["method"] for row in solves))
  lines = [
    "## Many tasks: update time (ms) / torchjd's time (ms), compile time (s)",
    "",
    "One (T, D) float32 leaf of standard normal entries; jitted, after compilation; torchjd's aggregator",
    "on the same matrix, the calls taking turns. `*`: torchjd timed by one call (over the budget).",
    "",
    "| T | D | " + " | ".join(methods) + " |",
    "|---|---|" + "---|" * len(methods),
  ]
  by_case = {}
  for row in solves:
    by_case.setdefault((row["T"], row["D"]), {})[row["method"]] = row
  for (num_tasks, dim), cells in by_case.items():
    entries = []
    for name in methods:
      row = cells[name]
      text = _ms(row["ours_ms"])
      if "torchjd_ms" in row:
        star = "*" if row.get("torchjd_single_call") else ""
        text += f" / {_ms(row['torchjd_ms'])}{star} ({row['peer_ratio']:.2f}x)"
      entries.append(f"{text}, {row['compile_s']:.1f} s")
    lines.append(f"| {num_tasks} | {dim:g} | " + " | ".join(entries) + " |")
  lines += [
    "",
    "## Many tasks: the Gram pass (GradOPS against the one-pass floor)",
    "",
    "| D | T | GradOPS (ms) | floor (ms) | ratio | torchjd UPGrad (ms) |",
    "|---|---|---|---|---|---|",
  ]
  for row in gram_pass:
    times = [
      _ms(row["gradops_ms"]),
      _ms(row["floor_ms"]),
      f"{row['floor_ratio']:.2f}",
      _ms(row.get("torchjd_upgrad_ms")),
    ]
    lines.append(f"| {row['D']:g} | {row['T']} | " + " | ".join(times) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  import json

  args = mode_parser(__doc__, MODES, RESULTS).parse_args(argv)
  mode = args.mode or "quick"
  results = run(mode, progress=lambda text: print(text, file=sys.stderr, flush=True))
  results["machine"] = (
    f"{platform.machine()} ({cpu_model()}), {jax.devices()[0].device_kind}, "
    f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__}"
  )
  table = markdown(results)
  print(results["machine"])
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"many-tasks-{mode}.md").write_text(f"{results['machine']}\n\n{table}")
  (args.out / f"many-tasks-{mode}.json").write_text(json.dumps(results, indent=1, default=str))
  return results


if __name__ == "__main__":
  main()
