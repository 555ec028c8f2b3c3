"""The README's quickstart runs and both task losses fall."""

import importlib.util
import pathlib


def test_quickstart_losses_fall(capsys):
  path = pathlib.Path(__file__).parents[1] / "examples" / "quickstart.py"
  spec = importlib.util.spec_from_file_location("quickstart", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  final = module.main(steps=100)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
  first = [float(v) for v in lines[0].split()[-2:]]
  assert all(f < 0.5 * s for f, s in zip(map(float, final), first))
