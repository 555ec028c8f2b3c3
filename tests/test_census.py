"""The Census-Income loader and training script, on small files in the real format."""

import importlib.util
import io
import pathlib
import sys
import tarfile

import numpy as np
import pytest

CENSUS = pathlib.Path(__file__).parents[1] / "examples" / "census"


def _load(name):
  sys.path.insert(0, str(CENSUS))  # train.py imports its sibling as `data` when run as a script
  try:
    spec = importlib.util.spec_from_file_location(f"census_{name}", CENSUS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(CENSUS))
  return module


data = _load("data")


def _rows(n, seed):
  """Rows with the 42 columns of census-income.names; the labels depend on age and sex."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    age = int(rng.integers(0, 90))
    row = [rng.choice(["a", "b", "c"]) for _ in range(data.NUM_COLUMNS)]
    for column in data.CONTINUOUS:
      row[column] = str(int(rng.integers(0, 1000)))
    row[0] = str(age)
    row[12] = rng.choice(["Male", "Female"])
    row[data.INSTANCE_WEIGHT] = f"{rng.uniform(100, 3000):.2f}"
    row[data.INCOME] = "50000+." if age > 40 and rng.random() < 0.6 else "- 50000."
    row[data.MARITAL] = "Never married" if age < 25 else "Divorced"
    row[data.EDUCATION] = "Bachelors degree(BA AB BS)" if row[12] == "Male" else "Some college but no degree"
    rows.append(row)
  return rows


def _lines(rows):
  return [", ".join(row) for row in rows]


def test_labels_follow_the_paper_tasks():
  rows = data.parse_rows(_lines(_rows(50, 0)), "synthetic")
  labels = data.labels_of(rows)
  for row, (income, marital, education) in zip(rows, labels):
    assert income == (row[data.INCOME] == "50000+.")
    assert marital == (row[data.MARITAL] == "Never married")
    # "Some college but no degree" is not a college degree.
    assert education == (row[data.EDUCATION] == "Bachelors degree(BA AB BS)")


def test_malformed_files_are_refused_with_the_row_number():
  lines = _lines(_rows(5, 1))
  lines[3] = lines[3].rsplit(",", 1)[0]  # 41 fields
  with pytest.raises(ValueError, match="row 4: expected 42 fields, found 41"):
    data.parse_rows(lines, "synthetic")
  lines = _lines(_rows(5, 1))
  lines[1] = lines[1].replace("50000.", "5000.").replace("50000+.", "5000.")
  with pytest.raises(ValueError, match="row 2: unknown income label"):
    data.parse_rows(lines, "synthetic")
  with pytest.raises(ValueError, match="no rows"):
    data.parse_rows([], "synthetic")


def _archive(tmp_path, train_lines, test_lines):
  archive = tmp_path / data.SDIST_FILE
  with tarfile.open(archive, "w:gz") as tar:
    for split, lines in (("train", train_lines), ("test", test_lines)):
      payload = ("\n".join(lines) + "\n").encode()
      info = tarfile.TarInfo(data.MEMBER.format(split=split))
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return archive


def test_load_reads_the_cached_sdist_encodes_and_caches(tmp_path):
  _archive(tmp_path, _lines(_rows(300, 2)), _lines(_rows(100, 3)))
  train, validation, test = data.load(tmp_path, seed=0)
  assert train.features.shape[0] == 300 and validation.features.shape[0] == test.features.shape[0] == 50
  assert train.features.shape[1] == validation.features.shape[1]
  np.testing.assert_allclose(train.features[:, : len(data.CONTINUOUS)].mean(axis=0), 0.0, atol=1e-5)
  assert set(np.unique(train.features[:, len(data.CONTINUOUS) :])) <= {0.0, 1.0}
  assert (tmp_path / data.encoded_cache_name(0)).exists()
  again = data.load(tmp_path, seed=0)
  np.testing.assert_array_equal(again[2].features, test.features)


def test_weeks_worked_is_standardised_and_veterans_benefits_one_hot():
  """census-income.names: column 38 is veterans' benefits (codes 0, 1, 2), 39 weeks worked (0-52)."""
  rows = data.parse_rows(_lines(_rows(40, 5)), "train")
  for index, row in enumerate(rows):
    row[38], row[39] = str(index % 3), str(index % 53)
  encoder = data.Encoder(rows)
  assert 39 in data.CONTINUOUS and 38 not in data.CONTINUOUS
  assert sorted(encoder.index[38]) == ["0", "1", "2"]
  assert 39 not in encoder.index
  weeks = encoder(rows)[:, data.CONTINUOUS.index(39)]
  np.testing.assert_allclose(weeks.mean(), 0.0, atol=1e-5)


def test_encoded_cache_name_names_the_feature_set(monkeypatch):
  before = data.encoded_cache_name(0)
  assert before != data.encoded_cache_name(1)
  monkeypatch.setattr(data, "CONTINUOUS", data.CONTINUOUS[:-1] + (38,))
  assert data.encoded_cache_name(0) != before


def test_every_method_picks_one_epoch_by_the_average_validation_auc():
  """The single-task baseline stacks its per-task runs and picks one epoch, like the others."""
  valid = np.array([[0.9, 0.5], [0.6, 0.9], [0.7, 0.7]])  # task 0 peaks at epoch 0, task 1 at 1, mean at 1
  held_out = np.arange(6.0).reshape(3, 2)
  assert _load("train").at_best_epoch(valid, held_out) == [2.0, 3.0]


def test_one_seed_and_smoke_tables_say_so():
  train_module = _load("train")
  rows = train_module.summarise({"Uniform scaling": [[0.8, 0.7, 0.6]], "Single-task": [[0.81, 0.7, 0.61]]})
  table = train_module.markdown(rows, epochs=2, seeds=1, wall=1.0, command="x", quick=True)
  assert "nan" not in table and "(1 seed)" in table and "smoke run" in table


def test_unseen_categories_encode_as_zeros():
  train_rows = data.parse_rows(_lines(_rows(20, 4)), "train")
  test_rows = [list(row) for row in train_rows[:2]]
  test_rows[0][1] = "never seen"
  encoder = data.Encoder(train_rows)
  encoded = encoder(test_rows)
  column = encoder.index[1]
  assert encoded[0, list(column.values())].sum() == 0
  assert encoded[1, list(column.values())].sum() == 1


def test_missing_member_is_a_clear_error(tmp_path):
  archive = tmp_path / data.SDIST_FILE
  with tarfile.open(archive, "w:gz") as tar:
    info = tarfile.TarInfo("something/else.csv")
    tar.addfile(info, io.BytesIO(b""))
  with pytest.raises(ValueError, match="does not hold a readable"):
    data.read_rows(archive, "train")


def test_training_script_runs_and_summarises(tmp_path):
  train_module = _load("train")
  splits = data.split_from_rows(
    data.parse_rows(_lines(_rows(2048, 5)), "train"), data.parse_rows(_lines(_rows(400, 6)), "test")
  )
  results = {
    name: [train_module.run_method(name, splits, epochs=2, seed=seed) for seed in range(2)]
    for name in ("Single-task", "Uniform scaling", "GradOPS(a=-3)")
  }
  for scores in results.values():
    assert np.all((np.asarray(scores) >= 0) & (np.asarray(scores) <= 1))
  rows = train_module.summarise(results)
  assert rows["Single-task"]["delta_m"] == pytest.approx(0.0, abs=1e-9)
  # Ranks 1..3 within each task: the mean ranks of the three methods add up to 1 + 2 + 3.
  assert sum(row["mean_rank"] for row in rows.values()) == pytest.approx(6.0)
  assert all(np.all(np.isfinite(row["half"])) for row in rows.values())
  table = train_module.markdown(rows, epochs=2, seeds=2, wall=1.0, command="x", quick=False)
  assert table.count("\n| ") == 4  # the header and three methods


def test_auc_matches_the_pairwise_definition():
  train_module = _load("train")
  rng = np.random.default_rng(7)
  labels = rng.random(200) < 0.3
  scores = np.round(rng.normal(size=200) + labels, 1)  # with ties
  pairs = [(p, n) for p in scores[labels] for n in scores[~labels]]
  expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
  assert train_module.auc(labels.astype(np.float32), scores) == pytest.approx(expected)


def test_alpha_sweep_and_weight_traces(tmp_path):
  train_module = _load("train")
  splits = data.split_from_rows(
    data.parse_rows(_lines(_rows(2048, 8)), "train"), data.parse_rows(_lines(_rows(400, 9)), "test")
  )
  alphas, gains = train_module.alpha_sweep(splits, [-1.0, 0.0, 1.0], epochs=1, seeds=1)
  assert gains.shape == (3, 4) and np.all(np.isfinite(gains))
  np.testing.assert_allclose(gains[:, 3], gains[:, :3].mean(axis=1))
  traces = train_module.weight_traces(splits, (1.0, 0.0), epochs=1)
  assert traces[1.0].shape == (2, 3)  # 2 full batches of 1024 rows, 3 task weights
  # alpha = 0 weighs every task that has a non-zero projected gradient by 1 (Eq. 5).
  assert set(np.unique(traces[0.0])) <= {0.0, 1.0}
  train_module.plot_sweep(alphas, gains, tmp_path / "sweep.png")
  train_module.plot_traces(traces, tmp_path / "traces.png")
  assert (tmp_path / "sweep.png").stat().st_size > 0 and (tmp_path / "traces.png").stat().st_size > 0
  assert "| -1 |" in train_module.sweep_markdown(alphas, gains, 1, 1, "x")


def test_recon_procedure_runs_and_reports(tmp_path):
  recon_module = _load("recon")
  splits = data.split_from_rows(
    data.parse_rows(_lines(_rows(2048, 10)), "train"), data.parse_rows(_lines(_rows(400, 11)), "test")
  )
  args = recon_module.parser().parse_args(
    ["--epochs", "1", "--warmup-epochs", "1", "--seeds", "2", "--out", str(tmp_path / "RECON.md")]
  )
  runs = recon_module.main(args, splits)
  for run in runs:
    assert run["selected"] == [run["scores"][0][0]] and run["selected"][0] in ("trunk1", "trunk2")
    assert (
      run["added"]
      == 2 * {"trunk1": (run["num_params"] - 192 * 192 - 192 - 3 * 193), "trunk2": 192 * 192 + 192}[run["selected"][0]]
    )
    for method in ("GradOPS", "GradOPS + Recon"):
      assert np.all((np.asarray(run["auc"][method]) >= 0) & (np.asarray(run["auc"][method]) <= 1))
    # The branched layer is no longer scored; the other trunk layer still is.
    assert set(run["occurrence"]["GradOPS"]) == {"trunk1", "trunk2"}
    assert set(run["occurrence"]["GradOPS + Recon"]) == {"trunk1", "trunk2"} - set(run["selected"])
    assert all(0 <= value <= 1 for value in run["occurrence"]["GradOPS"].values())
  table = (tmp_path / "RECON.md").read_text()
  assert "| GradOPS + Recon |" in table and "## Occurrence" in table
