"""Generates tests/data/torchjd_golden.npz: torchjd 0.18 aggregations of fixed inputs.

Run once, in an environment with torch and torchjd (never in CI):

    pip install torch==2.13.0 "torchjd[quadprog-projector,cagrad,nash-mtl]==0.18.0" numpy
    python tests/data/make_torchjd_golden.py

The inputs are float32 matrices (T, D) drawn here with a fixed seed; torchjd
aggregates their float64 copies. PCGrad and GradVac draw a random task order
in torchjd, so they are recorded for T = 2 only, where the order does not
matter.
"""

import pathlib

import numpy as np
import torch
from torchjd import aggregation as A


def inputs():
  rng = np.random.default_rng(2024)
  matrices = {}
  for num_tasks in (2, 3, 5):
    for kind in ("random", "conflicting"):
      g = rng.standard_normal((num_tasks, 20))
      if kind == "conflicting":
        g += 0.9 * rng.choice([-1.0, 1.0], size=(num_tasks, 1)) * rng.standard_normal(20)
      matrices[f"{kind}_T{num_tasks}"] = g.astype(np.float32)
  return matrices


def aggregators(num_tasks):
  out = {
    "mean": A.Mean(),
    "mgda": A.MGDA(),
    "upgrad": A.UPGrad(),
    "imtl_g": A.IMTLG(),
    "cagrad": A.CAGrad(c=0.5),
    "aligned_mtl": A.AlignedMTL(),
    "nash_mtl": A.NashMTL(n_tasks=num_tasks),
  }
  if num_tasks == 2:
    out.update(pcgrad=A.PCGrad(), gradvac=A.GradVac())
  return out


def main():
  record = {}
  for name, matrix in inputs().items():
    record[f"input/{name}"] = matrix
    jacobian = torch.from_numpy(matrix.astype(np.float64))
    for method, aggregator in aggregators(matrix.shape[0]).items():
      record[f"{method}/{name}"] = aggregator(jacobian).numpy()
  path = pathlib.Path(__file__).with_name("torchjd_golden.npz")
  np.savez_compressed(path, **record)
  print(f"wrote {len(record)} arrays to {path}")


if __name__ == "__main__":
  main()
