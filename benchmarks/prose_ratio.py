"""Prints the package's prose (docstring and comment lines) to code line ratio.

python -m benchmarks.prose_ratio [package_dir]
"""

import io
import pathlib
import sys
import tokenize


def count(path: pathlib.Path) -> tuple[int, int]:
  """(prose lines, code lines) of one Python file; blank lines count as neither."""
  prose, code = set(), set()
  tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
  previous = tokenize.NEWLINE
  for token in tokens:
    lines = range(token.start[0], token.end[0] + 1)
    if token.type == tokenize.COMMENT:
      prose.update(lines)
    elif token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
      prose.update(lines)  # a docstring: a string statement on its own
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
      code.update(lines)
    if token.type not in (tokenize.NL, tokenize.COMMENT):
      previous = token.type
  return len(prose), len(code - prose)


def main(root: str = "gradops_jax") -> None:
  files = sorted(pathlib.Path(root).rglob("*.py"))
  prose, code = map(sum, zip(*(count(path) for path in files)))
  print(f"{root}: {len(files)} files, {prose} prose lines, {code} code lines, ratio {prose / code:.2f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
