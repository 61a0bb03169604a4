"""Shape rules shared by the frameworks' attribute fixers."""

from __future__ import annotations

import numpy as np

__all__ = ["grouped_conv_count", "whole_blocks"]


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
