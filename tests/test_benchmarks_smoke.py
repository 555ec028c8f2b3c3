"""The benchmark entry point runs end to end at tiny sizes (no timing asserts)."""

import json
import platform

import jax

import pytest

from benchmarks import run


@pytest.mark.slow
def test_benchmark_entry_point_tiny(tmp_path, capsys):
  results = run.main(["--tiny", "--out", str(tmp_path), "--keep-freed-memory"])
  out = capsys.readouterr().out
  assert "Floor ratio" in out and "Bounds: where the time goes" in out
  assert "glibc keeps freed memory (mallopt)" in out or platform.libc_ver()[0] != "glibc"
  assert {row["T"] for row in results["bounds"]} == {2}
  assert json.loads((tmp_path / "tiny.json").read_text())["mode"] == "tiny"
  assert results["compile"]["retraces_over_steps"] == 0
  assert {row["method"] for row in results["methods"]} >= {"GradOPS", "PCGrad", "MGDA", "UPGrad"}
  assert "Gramian engine vs stacked engine" in out
  assert {(row["model"], row["T"]) for row in results["engines"]} == {("mlp", 2), ("mlp", 3), ("cnn", 2), ("cnn", 3)}
  assert set(results["engine_budget"]["largest"]) <= {"summed", "stacked", "gramian"}
  assert "Many tasks: update time" in out and "Many tasks: the Gram pass" in out
  assert {(row["method"], row["T"]) for row in results["many_tasks"]["solves"]} >= {("UPGrad", 16), ("GradOPS", 16)}
  assert "float32 mode over float64 mode" in out
  assert {(row["method"], row["family"]) for row in results["precision"]["accuracy"]} >= {("GradOPS", "conflicting")}


@pytest.mark.slow
def test_accelerator_entry_point_tiny(capsys):
  from benchmarks import accelerator

  results = accelerator.main(["--tiny"])
  out = capsys.readouterr().out
  assert results["platform"] == jax.devices()[0].platform
  assert {row["T"] for row in results["floor"]} == {4} and "float32 / floor" in out
  assert {row["path"] for row in results["precision"]} == {"default", "xla"}
  assert "Gramian engine vs stacked engine" in out
