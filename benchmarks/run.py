"""Benchmarks of gradops_jax: floor ratio, peers, scaling, memory, compile time, end to end.

    python -m benchmarks.run --quick     # a few minutes on 2 CPU cores
    python -m benchmarks.run --full      # the sizes of the targets
    python -m benchmarks.run --tiny      # tiny sizes: what the smoke test runs (pytest -m slow)
    python -m benchmarks.run --full --keep-freed-memory --out benchmarks/results/kept-memory
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m benchmarks.run --full --out benchmarks/results/huge-pages

Every time is the median of jitted, warmed-up calls with ``block_until_ready``,
and every speed figure is a ratio of two times measured side by side in this
one run. Results go to ``benchmarks/results/`` (markdown, JSON, PNG plots) and
the markdown table is printed. torch/torchjd are optional: where they cannot
be imported the peer rows say "skipped".
"""

import argparse
import ctypes
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradops_jax

RESULTS = pathlib.Path(__file__).parent / "results"

# Parameter shapes of ResNet-18 (ImageNet head), 62 leaves, 11.7M parameters.
RESNET18_SHAPES = (
  [(7, 7, 3, 64), (64,), (64,)]
  + [(3, 3, 64, 64), (64,), (64,)] * 4
  + [(3, 3, 64, 128), (128,), (128,), (3, 3, 128, 128), (128,), (128,), (1, 1, 64, 128), (128,), (128,)]
  + [(3, 3, 128, 128), (128,), (128,)] * 2
  + [(3, 3, 128, 256), (256,), (256,), (3, 3, 256, 256), (256,), (256,), (1, 1, 128, 256), (256,), (256,)]
  + [(3, 3, 256, 256), (256,), (256,)] * 2
  + [(3, 3, 256, 512), (512,), (512,), (3, 3, 512, 512), (512,), (512,), (1, 1, 256, 512), (512,), (512,)]
  + [(3, 3, 512, 512), (512,), (512,)] * 2
  + [(512, 1000), (1000,)]
)


def keep_freed_memory():
  """Makes glibc's malloc serve large blocks from its heap and keep the memory freed.

  By default glibc maps every block of more than 32 MB afresh and unmaps it
  when it is freed, so a call that returns a 40 MB array (XLA's and torch's
  alike) page-faults its output in again every time: at T=3, D=1e7 that was
  7 of the 11 ms of the weighted-sum floor. Thresholds of 2 GB
  (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``) turn that off for the whole
  process, so for both sides of every ratio.

  Returns:
    Whether glibc took both settings (``False`` where there is no glibc).
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  return all(libc.mallopt(option, 2**31 - 1) == 1 for option in (m_mmap_threshold, m_trim_threshold))


def cpu_model():
  """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    lines = []
  names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
  return names[0] if names else platform.processor() or "unknown CPU"


def median_times(calls, repeats, min_seconds=0.25, max_rounds=1000, warm_up=True):
  """Median wall time of each call in ``calls`` (name -> (fn, args)), measured side by side.

  After one warm-up call each (unless the caller has made them), the calls take turns, one call each per round,
  so that the machine's slow spells fall on all of them alike: at least
  ``repeats`` rounds, and more (up to ``max_rounds``) until every call has
  run for ``min_seconds`` in all, so that short calls get enough samples for
  a steady median.
  """
  for fn, args in calls.values() if warm_up else ():
    jax.block_until_ready(fn(*args))
  samples = {name: [] for name in calls}
  rounds = 0
  while rounds < max_rounds and (rounds < repeats or min(map(sum, samples.values())) < min_seconds):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples[name].append(time.perf_counter() - start)
    rounds += 1
  return {name: statistics.median(times) for name, times in samples.items()}


def median_time(fn, *args, repeats):
  """Median wall time of ``fn(*args)`` after one warm-up call."""
  return median_times({"": (fn, args)}, repeats)[""]


def cores_used(fn, *args, repeats):
  """Process CPU time over wall time of ``repeats`` warmed-up calls: how many cores ``fn`` keeps busy."""
  jax.block_until_ready(fn(*args))
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.process_time() - cpu) / (time.perf_counter() - wall)


def scaled_shapes(shapes, target_size):
  """ResNet-18 leaf shapes with channel counts scaled to about target_size."""
  base = sum(int(np.prod(s)) for s in shapes)
  factor = (target_size / base) ** 0.5
  out = []
  for shape in shapes:
    if len(shape) == 4:
      out.append((shape[0], shape[1], max(1, round(shape[2] * factor)), max(1, round(shape[3] * factor))))
    elif len(shape) == 2:
      out.append((max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))))
    else:
      out.append((max(1, round(shape[0] * factor)),))
  return out


def stacked_tree(num_tasks, shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
    f"leaf{i:03d}": jax.random.normal(k, (num_tasks, *s), jnp.float32) for i, (k, s) in enumerate(zip(keys, shapes))
  }


def params_like(tree):
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), tree)


def aggregator_step(tx, params):
  state = tx.init(params)
  return jax.jit(lambda grads: tx.update(grads, state, params)[0])


def floor_step(num_tasks):
  weights = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
  return jax.jit(lambda grads: jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads))


def bench_floor(sizes, tasks, repeats):
  rows = []
  for size in sizes:
    for layout in ("one leaf", "ResNet-18 leaves"):
      shapes = [(int(size),)] if layout == "one leaf" else scaled_shapes(RESNET18_SHAPES, size)
      dim = sum(int(np.prod(s)) for s in shapes)
      for num_tasks in tasks:
        tree = stacked_tree(num_tasks, shapes)
        params = params_like(tree)
        times = median_times(
          {
            "ours": (aggregator_step(gradops_jax.scale_by_gradops(num_tasks), params), (tree,)),
            "floor": (floor_step(num_tasks), (tree,)),
          },
          repeats,
        )
        ours, floor = times["ours"], times["floor"]
        rows.append(
          {
            "D": dim,
            "layout": layout,
            "T": num_tasks,
            "gradops_ms": 1e3 * ours,
            "floor_ms": 1e3 * floor,
            "floor_ratio": ours / floor,
          }
        )
        del tree
  return rows


def two_pass_step():
  """The least work of any method that needs all the gradients before combining them:
  a full read for one number per task, then the weighted sum (a second read)."""

  def step(grads):
    weights = jax.nn.softmax(sum(jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=1) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads)

  return jax.jit(step)


def float32_gram_step(num_tasks):
  """The fastest Gram pass we found XLA:CPU to compile: float32 block products
  in a scan (about 1e-6 relative error, where ours is 1e-16; not used)."""
  block = 8192

  def leaf_gram(rows):
    def accumulate(total, index):
      chunk = jax.lax.dynamic_slice_in_dim(rows, index * block, block, axis=1)
      return total + chunk @ chunk.T, None

    num_blocks = rows.shape[1] // block
    total = jax.lax.scan(accumulate, jnp.zeros((num_tasks, num_tasks), rows.dtype), jnp.arange(num_blocks))[0]
    rest = rows[:, num_blocks * block :]
    return total + rest @ rest.T

  def gram(grads):
    return sum(leaf_gram(jnp.reshape(leaf, (num_tasks, -1))) for leaf in jax.tree.leaves(grads))

  return jax.jit(gram)


def float64_gram_step(num_tasks):
  """Our Gram pass alone (exact float32 products, float64 sums); on CPU, the FFI kernel."""

  def gram(grads):
    with jax.enable_x64(True):
      return gradops_jax.task_gram(grads, num_tasks)

  return jax.jit(gram)


def combine_step(num_tasks):
  """Our combine pass alone, with fixed coefficients (on CPU, the FFI kernel: huge pages for its output)."""
  weights = np.full((num_tasks,), 1.0 / num_tasks)

  def combine(grads):
    with jax.enable_x64(True):
      return gradops_jax.combine(grads, jnp.asarray(weights))

  return jax.jit(combine)


def xla_gram_step(num_tasks):
  """The same pass in XLA (a scan of float64 block products): what GPU and TPU run,
  and CPU without the kernel."""

  def gram(grads):
    with jax.enable_x64(True):
      leaves = jax.tree.leaves(grads)
      return gradops_jax.task_gram(leaves, num_tasks, implementation="scan")

  return jax.jit(gram)


def bench_bounds(size, tasks, repeats):
  """Where the time goes, against the two-read bound, with the cores each pass keeps busy."""
  torch, peers = torchjd_aggregators()
  rows = []
  for num_tasks in tasks:
    tree = stacked_tree(num_tasks, [(int(size),)])
    params = params_like(tree)
    steps = {
      "floor": floor_step(num_tasks),
      "two_pass": two_pass_step(),
      "gram64": float64_gram_step(num_tasks),
      "gram64_xla": xla_gram_step(num_tasks),
      "gram32": float32_gram_step(num_tasks),
      "combine": combine_step(num_tasks),
      "gradops": aggregator_step(gradops_jax.scale_by_gradops(num_tasks), params),
    }
    calls = {name: (step, (tree,)) for name, step in steps.items()}
    if peers is not None:
      calls["torchjd_pcgrad"] = (peers["PCGrad"], (torch.from_numpy(np.array(tree["leaf000"])),))
    times = median_times(calls, repeats)
    row = {"T": num_tasks, "D": int(size), "torchjd_pcgrad_ms": None}
    for name, seconds in times.items():
      row[f"{name}_ms"] = 1e3 * seconds
    for name, step in steps.items():
      row[f"{name}_cores"] = cores_used(step, tree, repeats=repeats)
    if peers is not None:
      row["best_possible_vs_torchjd_pcgrad"] = row["two_pass_ms"] / row["torchjd_pcgrad_ms"]
    rows.append(row)
    del tree
  return rows


def method_transforms(num_tasks):
  return {
    "GradOPS": gradops_jax.scale_by_gradops(num_tasks),
    "PCGrad": gradops_jax.scale_by_pcgrad(num_tasks),
    "UPGrad": gradops_jax.scale_by_upgrad(num_tasks),
    "MGDA": gradops_jax.scale_by_mgda(num_tasks),
    "Mean": gradops_jax.scale_by_linear_scalarization(num_tasks),
    "IMTL-G": gradops_jax.scale_by_imtl_g(num_tasks),
    "CAGrad": gradops_jax.scale_by_cagrad(num_tasks),
    "ConicGrad": gradops_jax.scale_by_conicgrad(num_tasks),
    "Aligned-MTL": gradops_jax.scale_by_aligned_mtl(num_tasks),
    "Nash-MTL": gradops_jax.scale_by_nash_mtl(num_tasks),
    "GradVac": gradops_jax.scale_by_gradvac(num_tasks),
  }


def torchjd_aggregators():
  try:
    import torch
    from torchjd import aggregation
  except ImportError:
    return None, None
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # same cores as XLA
  return torch, {
    "PCGrad": aggregation.PCGrad(),
    "UPGrad": aggregation.UPGrad(),
    "MGDA": aggregation.MGDA(),
    "Mean": aggregation.Mean(),
  }


def bench_methods_and_peers(size, tasks, repeats):
  torch, peers = torchjd_aggregators()
  rows = []
  for num_tasks in tasks:
    tree = stacked_tree(num_tasks, [(int(size),)])
    params = params_like(tree)
    transforms = method_transforms(num_tasks)
    calls = {"floor": (floor_step(num_tasks), (tree,))}
    calls.update({name: (aggregator_step(tx, params), (tree,)) for name, tx in transforms.items()})
    if peers is not None:
      matrix = torch.from_numpy(np.array(tree["leaf000"]))
      calls.update({f"torchjd {name}": (aggregator, (matrix,)) for name, aggregator in peers.items()})
    times = median_times(calls, repeats)
    floor = times["floor"]
    for name in transforms:
      ours = times[name]
      row = {"method": name, "T": num_tasks, "D": int(size), "ours_ms": 1e3 * ours, "floor_ratio": ours / floor}
      if peers is not None and name in peers:
        theirs = times[f"torchjd {name}"]
        row.update(torchjd_ms=1e3 * theirs, peer_ratio=ours / theirs)
        if name == "PCGrad":  # the target compares our GradOPS with their PCGrad
          row["gradops_vs_torchjd_pcgrad"] = times["GradOPS"] / theirs
      else:
        row.update(torchjd_ms=None, peer_ratio="skipped" if name in ("PCGrad", "UPGrad", "MGDA", "Mean") else None)
      rows.append(row)
    del tree
  return rows


def bench_scaling(sizes, tasks, fixed_size, fixed_tasks, repeats):
  by_size, by_tasks = [], []
  for size in sizes:
    tree = stacked_tree(fixed_tasks, [(int(size),)])
    params = params_like(tree)
    times = median_times(
      {
        "ours": (aggregator_step(gradops_jax.scale_by_gradops(fixed_tasks), params), (tree,)),
        "floor": (floor_step(fixed_tasks), (tree,)),
      },
      repeats,
    )
    ours, floor = times["ours"], times["floor"]
    by_size.append({"D": int(size), "T": fixed_tasks, "gradops_ms": 1e3 * ours, "floor_ms": 1e3 * floor})
  for num_tasks in tasks:
    tree = stacked_tree(num_tasks, [(int(fixed_size),)])
    params = params_like(tree)
    tx = gradops_jax.scale_by_gradops(num_tasks)
    times = median_times(
      {"ours": (aggregator_step(tx, params), (tree,)), "floor": (floor_step(num_tasks), (tree,))}, repeats
    )
    ours, floor = times["ours"], times["floor"]
    gram = jnp.asarray(np.cov(np.random.default_rng(0).standard_normal((num_tasks, 4 * num_tasks))))
    with jax.enable_x64(True):
      solve = jax.jit(lambda k: gradops_jax.gradops_solve(k.astype(jnp.float64)).weights)
      solve_time = median_time(solve, gram, repeats=repeats)
    by_tasks.append(
      {
        "T": num_tasks,
        "D": int(fixed_size),
        "gradops_ms": 1e3 * ours,
        "floor_ms": 1e3 * floor,
        "ratio": ours / floor,
        "solve_ms": 1e3 * solve_time,
        "solve_fraction": solve_time / ours,
      }
    )
  return by_size, by_tasks


def bench_memory(size, tasks):
  rows = []
  for num_tasks in tasks:
    grads = jax.ShapeDtypeStruct((num_tasks, int(size)), jnp.float32)
    params = {"w": jnp.zeros((int(size),), jnp.float32)}
    tx = gradops_jax.scale_by_gradops(num_tasks)
    state = tx.init(params)
    compiled = jax.jit(lambda g: tx.update({"w": g}, state, params)[0]).lower(grads).compile()
    analysis = compiled.memory_analysis()
    temp = analysis.temp_size_in_bytes if analysis is not None else float("nan")
    rows.append({"T": num_tasks, "D": int(size), "temp_bytes": temp, "temp_in_param_buffers": temp / (4 * size)})
  return rows


def bench_compile(num_leaves, steps):
  shapes = [(64, 32)] * num_leaves
  tree = stacked_tree(3, shapes)
  params = params_like(tree)
  tx = gradops_jax.scale_by_gradops(3)
  traces = []

  def update(grads, state):
    traces.append(1)
    return tx.update(grads, state, params)

  step = jax.jit(update)
  state = tx.init(params)
  start = time.perf_counter()
  step.lower(tree, state).compile()
  compile_s = time.perf_counter() - start
  traces.clear()
  for index in range(steps):
    tree = jax.tree.map(lambda x: x + index, tree)
    _, state = step(tree, state)
  jax.block_until_ready(state)
  return {"leaves": num_leaves, "compile_s": compile_s, "retraces_over_steps": len(traces), "steps": steps}


def bench_end_to_end(width, num_tasks, batch, repeats):
  from flax import nnx

  class MultiHead(nnx.Module):
    def __init__(self, rngs):
      self.trunk1 = nnx.Linear(width, width, rngs=rngs)
      self.trunk2 = nnx.Linear(width, width, rngs=rngs)
      self.heads = nnx.List([nnx.Linear(width, 1, rngs=rngs) for _ in range(num_tasks)])

    def __call__(self, x):
      h = nnx.relu(self.trunk2(nnx.relu(self.trunk1(x))))
      return jnp.concatenate([head(h) for head in self.heads], axis=-1)

  x = jax.random.normal(jax.random.key(0), (batch, width))
  y = jax.random.normal(jax.random.key(1), (batch, num_tasks))

  def task_losses(model):
    return jnp.mean((model(x) - y) ** 2, axis=0)

  model_a = MultiHead(nnx.Rngs(0))
  opt_a = nnx.Optimizer(model_a, gradops_jax.gradops(1e-3, num_tasks), wrt=nnx.Param)

  # Each step returns a value computed after the update so that timing waits
  # for it (block_until_ready on None would return at dispatch).
  @nnx.jit
  def gradops_step(model, optimizer):
    _, grads = gradops_jax.value_and_task_grads(task_losses)(model)
    optimizer.update(model, grads)
    return model.trunk1.kernel[...].sum()

  @nnx.jit
  def task_grads_only(model):
    return gradops_jax.value_and_task_grads(task_losses)(model)[1]

  model_b = MultiHead(nnx.Rngs(0))
  opt_b = nnx.Optimizer(model_b, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def summed_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(task_losses(m)))(model)
    optimizer.update(model, grads)
    return model.trunk1.kernel[...].sum()

  full = median_time(gradops_step, model_a, opt_a, repeats=repeats)
  backward = median_time(task_grads_only, model_a, repeats=repeats)
  baseline = median_time(summed_step, model_b, opt_b, repeats=repeats)
  return {
    "width": width,
    "T": num_tasks,
    "batch": batch,
    "gradops_step_ms": 1e3 * full,
    "task_backward_ms": 1e3 * backward,
    "summed_adam_step_ms": 1e3 * baseline,
    "step_ratio": full / baseline,
    "aggregation_share": max(full - backward, 0.0) / full,
  }


def _towers_model(width, num_tasks, seed=0):
  """A shared 2-layer trunk and one (width x width + width x 1) tower per task."""
  keys = iter(jax.random.split(jax.random.key(seed), 2 + 2 * num_tasks))
  params = {
    "trunk": {name: jax.random.normal(next(keys), (width, width)) / width**0.5 for name in ("w1", "w2")},
    "towers": [
      {
        "w": jax.random.normal(next(keys), (width, width)) / width**0.5,
        "out": jax.random.normal(next(keys), (width, 1)) / width**0.5,
      }
      for _ in range(num_tasks)
    ],
  }

  def task_losses(params, x, y):
    hidden = jnp.tanh(jnp.tanh(x @ params["trunk"]["w1"]) @ params["trunk"]["w2"])
    outputs = [jnp.tanh(hidden @ tower["w"]) @ tower["out"] for tower in params["towers"]]
    return jnp.mean((jnp.concatenate(outputs, axis=-1) - y) ** 2, axis=0)

  return params, task_losses


def bench_shared_partition(width, tasks, batch, repeats):
  """Aggregating the whole model vs the shared trunk only (heads summed)."""
  rows = []
  for num_tasks in tasks:
    params, task_losses = _towers_model(width, num_tasks)
    x = jax.random.normal(jax.random.key(1), (batch, width))
    y = jax.random.normal(jax.random.key(2), (batch, num_tasks))
    _, grads = jax.jit(gradops_jax.value_and_task_grads(task_losses))(params, x, y)
    shared = {"trunk": {"w1": True, "w2": True}, "towers": [{"w": False, "out": False}] * num_tasks}
    whole = gradops_jax.scale_by_gradops(num_tasks)
    partitioned = gradops_jax.aggregate_shared(gradops_jax.scale_by_gradops(num_tasks), num_tasks, shared)
    whole_ms = median_time(aggregator_step(whole, params), grads, repeats=repeats)
    shared_ms = median_time(aggregator_step(partitioned, params), grads, repeats=repeats)
    rows.append(
      {
        "width": width,
        "T": num_tasks,
        "whole_model_ms": 1e3 * whole_ms,
        "shared_only_ms": 1e3 * shared_ms,
        "ratio": shared_ms / whole_ms,
      }
    )
  return rows


def bench_task_gradients(width, num_tasks, batch, repeats):
  """Per-task gradients: our mapped VJP vs a vmapped VJP, jax.jacrev and T jax.grad calls.

  Times the gradients alone, and a whole step (gradients, GradOPS, Adam) with
  our mapped VJP and with the vmapped one.
  """
  params, task_losses = _towers_model(width, num_tasks)
  x = jax.random.normal(jax.random.key(1), (batch, width))
  y = jax.random.normal(jax.random.key(2), (batch, num_tasks))

  def vmapped_vjp(p):
    losses, vjp_fn = jax.vjp(lambda q: task_losses(q, x, y), p)
    return jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))[0]

  methods = {
    "mapped_vjp": lambda p: gradops_jax.value_and_task_grads(task_losses)(p, x, y)[1],
    "vmapped_vjp": vmapped_vjp,
    "jacrev": lambda p: jax.jacrev(task_losses)(p, x, y),
    "separate_grads": lambda p: jax.tree.map(
      lambda *g: jnp.stack(g), *[jax.grad(lambda q, i=i: task_losses(q, x, y)[i])(p) for i in range(num_tasks)]
    ),
  }
  row = {"width": width, "T": num_tasks, "batch": batch}
  for name, fn in methods.items():
    row[f"{name}_ms"] = 1e3 * median_time(jax.jit(fn), params, repeats=repeats)
  tx = gradops_jax.gradops(1e-3, num_tasks)
  state = tx.init(params)
  for name in ("mapped_vjp", "vmapped_vjp"):

    def step(p, s, grads_fn=methods[name]):
      updates, s = tx.update(grads_fn(p), s, p)
      return optax.apply_updates(p, updates), s

    row[f"step_{name}_ms"] = 1e3 * median_time(jax.jit(step), params, state, repeats=repeats)
  return row


def markdown(results):
  lines = [
    f"# gradops_jax benchmarks ({results['mode']})",
    "",
    f"Machine: {results['machine']}; CPU kernels (gradops_jax.kernels_available): "
    f"{'built' if results['cpu_kernels'] else 'not available, Gram and combine passes in XLA'}; "
    f"malloc: {results['malloc']}",
    "",
  ]
  lines += [
    "## 1. Floor ratio (scale_by_gradops / one weighted sum over tasks)",
    "",
    "| D | layout | T | gradops ms | floor ms | ratio |",
    "|---|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['D']:.2e} | {r['layout']} | {r['T']} | {r['gradops_ms']:.2f} | {r['floor_ms']:.2f} | {r['floor_ratio']:.2f} |"
    for r in results["floor"]
  ]
  lines += [
    "",
    "## 2. Methods and peers (one leaf)",
    "",
    "| method | T | D | ours ms | / floor | torchjd ms | ours / torchjd |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results["methods"]:
    torch_ms = "" if r["torchjd_ms"] is None else f"{r['torchjd_ms']:.2f}"
    peer = r["peer_ratio"]
    peer = "" if peer is None else (peer if isinstance(peer, str) else f"{peer:.3f}")
    lines.append(
      f"| {r['method']} | {r['T']} | {r['D']:.1e} | {r['ours_ms']:.2f} | {r['floor_ratio']:.2f} | {torch_ms} | {peer} |"
    )
  pcgrad_rows = [r for r in results["methods"] if "gradops_vs_torchjd_pcgrad" in r]
  for r in pcgrad_rows:
    lines.append(
      f"\nOur GradOPS / torchjd PCGrad at T={r['T']}, D={r['D']:.1e}: **{r['gradops_vs_torchjd_pcgrad']:.3f}**"
    )
  lines += ["", "## 3. Scaling", "", "| D | T | gradops ms | floor ms |", "|---|---|---|---|"]
  lines += [f"| {r['D']:.1e} | {r['T']} | {r['gradops_ms']:.3f} | {r['floor_ms']:.3f} |" for r in results["scaling_D"]]
  lines += [
    "",
    "| T | D | gradops ms | floor ms | ratio | T x T solve ms | solve share |",
    "|---|---|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['T']} | {r['D']:.1e} | {r['gradops_ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio']:.2f} | {r['solve_ms']:.3f} | {r['solve_fraction']:.3f} |"
    for r in results["scaling_T"]
  ]
  lines += [
    "",
    "## 4. Peak temporary memory of the compiled update",
    "",
    "| T | D | temp bytes | in parameter-sized float32 buffers |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {r['T']} | {r['D']:.1e} | {r['temp_bytes']:.0f} | {r['temp_in_param_buffers']:.3f} |" for r in results["memory"]
  ]
  c = results["compile"]
  lines += [
    "",
    "## 5. Compile time",
    "",
    f"{c['leaves']}-leaf pytree: {c['compile_s']:.2f} s to compile; {c['retraces_over_steps']} retraces over {c['steps']} steps.",
  ]
  e = results["end_to_end"]
  lines += [
    "",
    "## 6. End-to-end step (Flax NNX, 2-layer trunk, T heads)",
    "",
    f"width {e['width']}, T={e['T']}, batch {e['batch']}: value_and_task_grads + gradops "
    f"{e['gradops_step_ms']:.2f} ms vs summed loss + adam {e['summed_adam_step_ms']:.2f} ms "
    f"(ratio {e['step_ratio']:.2f}); per-task backward alone {e['task_backward_ms']:.2f} ms, "
    f"so aggregation + Adam is {100 * e['aggregation_share']:.0f}% of the step.",
  ]
  lines += [
    "",
    "## 7. Shared trunk only (`aggregate_shared`) vs the whole model",
    "",
    "| width | T | whole model ms | shared only ms | ratio |",
    "|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['width']} | {r['T']} | {r['whole_model_ms']:.2f} | {r['shared_only_ms']:.2f} | {r['ratio']:.2f} |"
    for r in results["shared_partition"]
  ]
  g = results["task_gradients"]
  lines += [
    "",
    f"## 8. Per-task gradients (trunk + towers model, width {g['width']}, T={g['T']}, batch {g['batch']})",
    "",
    "| gradients | ms | whole step (+ GradOPS + Adam) ms |",
    "|---|---|---|",
    f"| mapped VJP (`value_and_task_grads`) | {g['mapped_vjp_ms']:.2f} | {g['step_mapped_vjp_ms']:.2f} |",
    f"| vmapped VJP | {g['vmapped_vjp_ms']:.2f} | {g['step_vmapped_vjp_ms']:.2f} |",
    f"| `jax.jacrev` | {g['jacrev_ms']:.2f} | |",
    f"| T separate `jax.grad` | {g['separate_grads_ms']:.2f} | |",
  ]
  lines += [
    "",
    "## 9. Bounds: where the time goes (one leaf)",
    "",
    "Times in ms, each with the cores it keeps busy (process CPU time / wall time). "
    "*two reads*: one number per task from a full read, then the weighted sum, in XLA: the least "
    "any method that must see every gradient before combining them can do once the "
    "gradients do not fit in cache, when its output is faulted in 4 KiB at a time as XLA's is. "
    "*combine*: our combine pass alone (the CPU kernel where it is built, which asks for huge "
    "pages for its output). *Gram f64*: our Gram pass alone (the CPU kernel where "
    "it is built). *Gram f64, XLA*: the same pass in XLA, as GPU and TPU run it. *Gram f32*: the "
    "fastest Gram pass we found XLA:CPU to compile (float32 block products, not used).",
    "",
    "| T | D | floor | two reads | combine | Gram f64 | Gram f64, XLA | Gram f32 | GradOPS | torchjd PCGrad | two reads / torchjd PCGrad |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["bounds"]:
    keys = ("floor", "two_pass", "combine", "gram64", "gram64_xla", "gram32", "gradops")
    cells = [f"{r[f'{k}_ms']:.2f} ({r[f'{k}_cores']:.1f})" for k in keys]
    peer = "skipped" if r["torchjd_pcgrad_ms"] is None else f"{r['torchjd_pcgrad_ms']:.2f}"
    best = f"{r['best_possible_vs_torchjd_pcgrad']:.2f}" if "best_possible_vs_torchjd_pcgrad" in r else ""
    lines.append(f"| {r['T']} | {r['D']:.1e} | " + " | ".join(cells) + f" | {peer} | {best} |")
  return "\n".join(lines) + "\n"


def plots(results, directory):
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(5, 4))
  sizes = [r["D"] for r in results["scaling_D"]]
  ax.loglog(sizes, [r["gradops_ms"] for r in results["scaling_D"]], "o-", label="scale_by_gradops")
  ax.loglog(sizes, [r["floor_ms"] for r in results["scaling_D"]], "s--", label="floor (weighted sum)")
  ax.set_xlabel("D (parameters)")
  ax.set_ylabel("time (ms)")
  ax.set_title(f"T = {results['scaling_D'][0]['T']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(directory / "time_vs_D.png", dpi=120)
  fig, ax = plt.subplots(figsize=(5, 4))
  tasks = [r["T"] for r in results["scaling_T"]]
  ax.semilogx(tasks, [r["ratio"] for r in results["scaling_T"]], "o-", base=2, label="gradops / floor")
  ax.set_xlabel("T (tasks)")
  ax.set_ylabel("time ratio")
  ax.legend()
  fig.tight_layout()
  fig.savefig(directory / "ratio_vs_T.png", dpi=120)
  plt.close("all")


MODES = {
  "tiny": dict(
    floor_sizes=[1e4],
    floor_tasks=[2],
    method_size=1e4,
    method_tasks=[2],
    scale_sizes=[1e3, 1e4],
    scale_tasks=[2, 4],
    fixed_size=1e4,
    memory_size=1e4,
    compile_leaves=10,
    compile_steps=5,
    width=32,
    repeats=2,
  ),
  "quick": dict(
    floor_sizes=[1e6],
    floor_tasks=[2, 3, 4, 8],
    method_size=1e6,
    method_tasks=[3, 8],
    scale_sizes=[1e4, 1e5, 1e6, 1e7],
    scale_tasks=[2, 4, 8, 16, 32, 64],
    fixed_size=1e5,
    memory_size=1e6,
    compile_leaves=100,
    compile_steps=100,
    width=1024,
    repeats=5,
  ),
  "full": dict(
    floor_sizes=[1e6, 1e7],
    floor_tasks=[2, 3, 4, 8],
    method_size=1e7,
    method_tasks=[3, 8],
    scale_sizes=[1e4, 1e5, 1e6, 1e7],
    scale_tasks=[2, 4, 8, 16, 32, 64],
    fixed_size=1e6,
    memory_size=1e7,
    compile_leaves=100,
    compile_steps=100,
    width=1024,
    repeats=7,
  ),
}


def mode_parser(doc, modes, results):
  """A command line with one flag per mode (``--tiny``, ``--quick``, ...) and ``--out``."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  group = parser.add_mutually_exclusive_group()
  for mode in modes:
    group.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode)
  parser.add_argument("--out", type=pathlib.Path, default=results)
  return parser


def main(argv=None):
  parser = mode_parser(__doc__, MODES, RESULTS)
  parser.add_argument(
    "--keep-freed-memory",
    action="store_true",
    help="glibc malloc keeps freed memory, for XLA and torch alike (see keep_freed_memory)",
  )
  args = parser.parse_args(argv)
  mode = args.mode or "quick"
  m = MODES[mode]
  settings = [f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"] if os.environ.get("GLIBC_TUNABLES") else []
  if args.keep_freed_memory:
    settings.append("glibc keeps freed memory (mallopt)" if keep_freed_memory() else "mallopt refused")
  malloc = "; ".join(settings) or "system default"
  results = {
    "mode": mode,
    "machine": f"{platform.machine()} ({cpu_model()}), {jax.devices()[0].device_kind}, "
    f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__}",
    "cpu_kernels": gradops_jax.kernels_available(),
    "malloc": malloc,
  }
  results["floor"] = bench_floor(m["floor_sizes"], m["floor_tasks"], m["repeats"])
  results["methods"] = bench_methods_and_peers(m["method_size"], m["method_tasks"], m["repeats"])
  results["scaling_D"], results["scaling_T"] = bench_scaling(
    m["scale_sizes"], m["scale_tasks"], m["fixed_size"], 3, m["repeats"]
  )
  results["memory"] = bench_memory(m["memory_size"], [2, 3, 8])
  results["compile"] = bench_compile(m["compile_leaves"], m["compile_steps"])
  results["end_to_end"] = bench_end_to_end(m["width"], 3, 256, m["repeats"])
  results["shared_partition"] = bench_shared_partition(m["width"], [3, 8], 256, m["repeats"])
  results["task_gradients"] = bench_task_gradients(m["width"], 3, 256, m["repeats"])
  results["bounds"] = bench_bounds(m["method_size"], m["method_tasks"], m["repeats"])
  from benchmarks import engines  # imports this module's timing helpers

  results["engines"], results["engine_budget"] = engines.run(mode)
  from benchmarks import many_tasks

  results["many_tasks"] = many_tasks.run(mode)
  from benchmarks import precision

  results["precision"] = precision.run("tiny" if mode == "tiny" else "quick")
  table = (
    markdown(results)
    + "\n"
    + engines.markdown(results["engines"], results["engine_budget"])
    + "\n"
    + many_tasks.markdown(results["many_tasks"])
    + "\n"
    + precision.markdown(results["precision"])
  )
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{mode}.md").write_text(table)
  (args.out / f"{mode}.json").write_text(json.dumps(results, indent=1, default=str))
  plots(results, args.out)
  return results


if __name__ == "__main__":
  main()
