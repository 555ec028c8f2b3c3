r"""Loop carries and custom calls that keep their varying axes inside ``jax.shard_map``.

Under ``jax.shard_map`` (with its default ``check_vma=True``) every value's
type records the manual mesh axes it varies over. A loop whose initial carry
is a constant but whose body mixes in per-device data (the Gram matrix of the
task gradients each device holds) changes the carry's type, which
``lax.while_loop``, ``lax.scan`` and ``lax.fori_loop`` refuse; a custom call's
result carries no such axes at all. :func:`varying_like` marks such values as
varying from the start. Outside ``shard_map`` it returns its argument.
"""

from typing import Any

import jax


def varying_axes(value: Any) -> frozenset:
  """The manual mesh axes over which ``value`` varies inside ``jax.shard_map`` (else empty)."""
  aval = jax.typeof(value)
  if hasattr(aval, "manual_axis_type"):
    return frozenset(aval.manual_axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


def varying_like(tree: Any, *references: Any) -> Any:
  """``tree`` with every leaf varying over the axes any leaf of ``tree`` or ``references`` varies over.

  Args:
    tree: a pytree of arrays (a loop's initial carry, a custom call's result).
    *references: pytrees of the arrays the loop body or the call reads.

  Returns:
    ``tree`` with the same values, each leaf marked with
    ``jax.lax.pcast(..., to="varying")`` where it lacked an axis.
  """
  axes = frozenset().union(*(varying_axes(leaf) for leaf in jax.tree.leaves((tree, references))))
  if not axes:
    return tree

  def mark(leaf):
    missing = tuple(sorted(axes - varying_axes(leaf)))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(mark, tree)
