"""The accelerator figures, on whatever ``jax.devices()`` offers: one command for CPU, GPU or TPU.

    python -m benchmarks.accelerator --quick   # a few minutes
    python -m benchmarks.accelerator --tiny    # seconds; what the smoke test runs

Three tables, on ``jax.devices()[0]`` (the platform is printed with them):

* **Floor ratio, modes side by side.** GradOPS's update in its ``"auto"``
  mode and in both explicit modes, against the one-pass floor (a jitted
  weighted sum of the T gradients), on one ``(T, D)`` float32 leaf. On a TPU
  ``"auto"`` is the float32 mode; on CPU and GPU it is the float64 mode.
* **Precision modes.** :func:`benchmarks.precision.bench_speed`: the update
  of GradOPS, UPGrad and MGDA in both modes side by side, on the default
  path and on the XLA path.
* **Engines.** :func:`benchmarks.engines.bench_engines`: the Gramian engine
  against the stacked engine and the summed loss.

No accelerator has been lent to this project yet: every figure committed
under ``benchmarks/results/`` is a CPU figure (``benchmarks/README.md``).
"""

import jax
import jax.numpy as jnp

import gradops_jax
from benchmarks import engines
from benchmarks import precision
from benchmarks.run import aggregator_step
from benchmarks.run import cpu_model
from benchmarks.run import floor_step
from benchmarks.run import median_times
from benchmarks.run import params_like


def bench_floor_ratio(tasks, dims, repeats, progress=print):
  """GradOPS in each precision mode over the one-pass floor, measured side by side."""
  rows = []
  for num_tasks in tasks:
    for dim in dims:
      tree = {"w": jax.random.normal(jax.random.key(0), (num_tasks, dim), jnp.float32)}
      params = params_like(tree)
      calls = {"floor": (floor_step(num_tasks), (tree,))}
      for mode in ("auto", "float64", "float32"):
        calls[mode] = (aggregator_step(gradops_jax.scale_by_gradops(num_tasks, precision=mode), params), (tree,))
      times = median_times(calls, repeats)
      row = {"T": num_tasks, "D": dim, "floor_ms": 1e3 * times["floor"]}
      row.update({f"{mode}_over_floor": times[mode] / times["floor"] for mode in ("auto", "float64", "float32")})
      rows.append(row)
      progress(f"accelerator: floor T={num_tasks} D={dim:.0e} done")
  return rows


def run(mode, progress=print):
  device = jax.devices()[0]
  results = {"platform": device.platform, "device": str(device.device_kind)}
  if mode == "tiny":
    results["floor"] = bench_floor_ratio((4,), (10_000,), 3, progress)
    results["precision"] = precision.bench_speed((4,), (1000,), 3, progress)
    results["engines"], results["engine_budget"] = engines.run("tiny")
    return results
  results["floor"] = bench_floor_ratio((8, 64), (1_000_000, 4_000_000), 10, progress)
  results["precision"] = precision.bench_speed((8, 64), (100_000, 1_000_000), 10, progress)
  results["engines"], results["engine_budget"] = engines.run("quick")
  return results


def markdown(results):
  device = results["device"] if results["platform"] != "cpu" else cpu_model()
  lines = [
    f"Platform: {results['platform']} ({device}); jax {jax.__version__}.",
    "",
    "### GradOPS over the one-pass floor, per precision mode",
    "",
    "| T | D | floor (ms) | auto / floor | float64 / floor | float32 / floor |",
    "|---:|---:|---:|---:|---:|---:|",
  ]
  for row in results["floor"]:
    lines.append(
      f"| {row['T']} | {row['D']:.0e} | {row['floor_ms']:.2f} | {row['auto_over_floor']:.2f} | "
      f"{row['float64_over_floor']:.2f} | {row['float32_over_floor']:.2f} |"
    )
  speed = precision.markdown({"accuracy": [], "speed": results["precision"]})
  lines += ["", speed[speed.index("### Speed") :]]
  lines += [engines.markdown(results["engines"], results["engine_budget"])]
  return "\n".join(lines) + "\n"


def main(argv=None):
  return precision.command_line(__doc__, run, markdown, lambda results: f"accelerator-{results['platform']}", argv)


if __name__ == "__main__":
  main()
