"""The wheel ships the license and the kernel sources it builds from."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).parents[1]


def test_wheel_ships_license_and_kernel_sources(tmp_path):
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  (wheel,) = tmp_path.glob("gradops_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert any(name.endswith(".dist-info/licenses/LICENSE") or name.endswith(".dist-info/LICENSE") for name in names), (
    names
  )
  for source in ("gram.cc", "combine.cc", "chunk_runner.h"):
    assert f"gradops_jax/_src/csrc/{source}" in names
