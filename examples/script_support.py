"""What the example scripts share: where they write, and how they show progress.

* :func:`scratch_dir`: results go to a scratch directory by default; the
  committed results are written only when ``--out`` names them.
* :func:`progress`: a tqdm bar on a terminal; under ``nohup``, in CI logs or
  piped to a file (where a bar prints nothing useful), one plain line every
  ``every`` seconds: ``desc: i/n, elapsed``.
"""

import pathlib
import sys
import tempfile
import time

from tqdm import tqdm


def scratch_dir(name: str) -> pathlib.Path:
  """``$TMPDIR/gradops_jax_examples/<name>``, created."""
  path = pathlib.Path(tempfile.gettempdir()) / "gradops_jax_examples" / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def progress(iterable, desc: str, every: float = 30.0, stream=None):
  stream = stream or sys.stderr
  if stream.isatty():
    yield from tqdm(iterable, desc=desc, file=stream)
    return
  items = list(iterable) if not hasattr(iterable, "__len__") else iterable
  total, start, last = len(items), time.monotonic(), -float("inf")
  for index, item in enumerate(items):
    now = time.monotonic()
    if now - last >= every:
      print(f"{desc}: {index}/{total}, {now - start:.0f} s", file=stream, flush=True)
      last = now
    yield item
  print(f"{desc}: {total}/{total}, {time.monotonic() - start:.0f} s", file=stream, flush=True)
