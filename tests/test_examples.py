"""The README's quickstart runs and both task losses fall."""

import importlib.util
import pathlib

import numpy as np


def test_quickstart_losses_fall(capsys):
  path = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.py"
  spec = importlib.util.spec_from_file_location("quickstart", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  final = module.main(steps=100)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
  first = [float(v) for v in lines[0].split()[-2:]]
  assert all(f < 0.5 * s for f, s in zip(map(float, final), first))


def _load_example(name):
  path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name.replace("/", "_"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_diagnostics_callback_logs_every_step_and_plots(tmp_path):
  diagnostics = _load_example("diagnostics")
  out = tmp_path / "diagnostics.png"
  log = diagnostics.main(steps=40, alpha=-1.0, out=out)
  data = log.arrays()
  assert data["weights"].shape == (40, 3) and data["projected"].shape == (40, 3)
  assert data["cosine"].shape == (40, 3, 3)
  np.testing.assert_allclose(np.diagonal(data["cosine"], axis1=1, axis2=2), 1.0, rtol=1e-6)
  assert np.all(data["weights"] >= 0) and data["projected"].any()
  assert np.all(data["losses"][-1] < data["losses"][0])
  assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_trade_off_quick(tmp_path, monkeypatch):
  """A smoke run writes to a scratch directory, labelled as such, never over the committed results."""
  import tempfile

  committed = (pathlib.Path(__file__).parents[1] / "examples" / "toy" / "RESULTS.md").read_bytes()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  trade_off = _load_example("toy/trade_off")
  paths, finals, front = trade_off.main(steps=60)
  tmp_path = tmp_path / "gradops_jax_examples" / "toy"
  assert "a smoke run" in (tmp_path / "RESULTS.md").read_text()
  assert (pathlib.Path(__file__).parents[1] / "examples" / "toy" / "RESULTS.md").read_bytes() == committed
  assert set(paths) == set(trade_off.METHODS)
  for path in paths.values():
    assert path.shape == (3, 61, 2) and np.all(np.isfinite(path))
    np.testing.assert_allclose(path[:, 0], np.asarray(trade_off.INITIAL_POINTS, np.float32))
  # Two tasks: GradOPS with alpha = 0 is PCGrad (Section 3.1 of the paper).
  np.testing.assert_allclose(paths["GradOPS a=0"], paths["PCGrad"], rtol=1e-5, atol=1e-6)
  assert front.ndim == 2 and np.all(np.diff(front[:, 0]) >= 0) and np.all(np.diff(front[:, 1]) < 0)
  for name in ("RESULTS.md", "trajectories.png", "objective_space.png"):
    assert (tmp_path / name).stat().st_size > 0


def test_progress_prints_plain_lines_when_not_on_a_terminal():
  import io
  import sys

  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
  try:
    import script_support
  finally:
    sys.path.pop(0)
  stream = io.StringIO()
  assert list(script_support.progress(range(5), desc="steps", every=0.0, stream=stream)) == list(range(5))
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith("steps: 0/5") and lines[-1].startswith("steps: 5/5") and len(lines) == 6


def test_gramian_engine_example_trains_and_reports_memory(capsys):
  example = _load_example("gramian_engine")
  losses = example.main(steps=60, width=64, depth=8, batch=8)
  out = capsys.readouterr().out
  buffers = {line.split()[0]: float(line.split(":")[1].split()[0]) for line in out.splitlines() if "engine:" in line}
  assert buffers["Gramian"] < buffers["stacked"], buffers
  means = [float(line.split()[5]) for line in out.splitlines() if line.startswith("step")]
  assert means[-1] < 0.8 * means[0], means
  assert losses.shape == (example.NUM_TASKS,)
