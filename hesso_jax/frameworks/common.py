"""Shape rules shared by the frameworks' attribute fixers."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from hesso_jax.groups import Path, format_path

__all__ = ["KeepMasks", "Site", "grouped_conv_count", "whole_blocks"]

KeepMasks = dict[Path, dict[int, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Site:
    """One module of the shrunk model, as a framework's attribute fixer sees it.

    Attributes:
      module: the module (already holding the smaller arrays).
      path: its path in the model.
      keep: ``{array path: {axis: bool[old length]}}``, the channels the plan kept on
        every axis it touched (axes it did not touch are absent).
    """

    module: Any
    path: Path
    keep: KeepMasks
    framework: ClassVar[str] = ""  # prefix of the module's type in error messages

    def error(self, message: str) -> ValueError:
        """A ValueError naming the module's type and path."""
        return ValueError(f"shrink_model: {self.framework}{type(self.module).__name__} at "
                          f"{format_path(self.path)!r}: {message}")

    def shape(self, *names: str) -> tuple[int, ...] | None:
        """Shape of the array at ``module.<names...>`` (None when it is None)."""
        node: Any = self.module
        for name in names:
            node = getattr(node, name, None)
            if node is None:
                return None
        return tuple(node.shape) if hasattr(node, "shape") else tuple(np.shape(node))

    def kept(self, *names: str, axis: int, length: int) -> np.ndarray:
        """``bool[length]``: the old channels kept on ``axis`` of ``module.<names...>``."""
        mask = self.keep.get((*self.path, *names), {}).get(axis)
        return np.ones(length, bool) if mask is None else mask


def whole_blocks(mask: np.ndarray, blocks: int) -> np.ndarray | None:
    """Per block, whether it is kept; None unless every block is kept or removed whole.

    Example:
      >>> import numpy as np
      >>> from hesso_jax.frameworks.common import whole_blocks
      >>> whole_blocks(np.array([1, 1, 0, 0], bool), 2)
      array([ True, False])
    """
    rows = mask.reshape(blocks, -1)
    return rows[:, 0] if (rows == rows[:, :1]).all() else None


def grouped_conv_count(out_keep: np.ndarray, groups: int) -> int:
    """The ``feature_group_count`` of a grouped conv after its output channels are cut.

    A conv with ``groups`` feature groups computes output block ``g`` (``out / groups``
    consecutive channels) from input block ``g``. It stays a valid grouped conv when every
    group keeps the same number of output channels, or none: groups with none left are
    gone (their input channels must go too, which the run-time check verifies); the
    kernel's per-group input axis is cut separately (the same index in every group).

    Args:
      out_keep: ``bool[out]``, the output channels kept.
      groups: the old ``feature_group_count``.

    Returns:
      The new ``feature_group_count``.

    Raises:
      ValueError: when the groups keep different numbers of channels, or none is left.

    Example:
      >>> import numpy as np
      >>> from hesso_jax.frameworks.common import grouped_conv_count
      >>> grouped_conv_count(np.array([1, 1, 0, 0, 1, 1], bool), 3)
      2
    """
    per_group = out_keep.reshape(groups, -1).sum(axis=1)
    alive = per_group > 0
    if not alive.any() or len(set(per_group[alive].tolist())) > 1:
        raise ValueError(
            f"grouped conv with feature_group_count={groups}: its output channels must be "
            f"removed in whole blocks of {out_keep.size // groups} (a whole group) or in "
            "equal numbers from every group, keeping at least one; kept per group: "
            f"{per_group.tolist()}")
    return int(alive.sum())
