"""Sharding layouts derived from the groups: tensor parallel over the prunable axes.

HESSO prunes along the group axes (attention heads, MLP neurons, channels). Sharding those
same axes over a tensor-parallel mesh axis (Megatron style) keeps every device's share of
a layer's heads or neurons together, so per-group reductions need one all-reduce over
``tp`` and surgery can round each family to a multiple of the ``tp`` size
(``shrink_model(round_to=...)``). The remaining large axis of every matrix goes over a
data/FSDP axis.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from hesso_jax.groups import Groups, tree_paths


def tensor_parallel_specs(tree: Any, groups: Groups, *, tp: str = "tp",
                          fsdp: str | None = "fsdp") -> Any:
    """PartitionSpecs: every grouped axis over ``tp``, the largest other one over ``fsdp``.

    Rule, leaf by leaf (``a_tp`` and ``a_fsdp`` are the axes given to ``tp`` and
    ``fsdp``):

    * a leaf that holds a member or a dependent of a family (the first one found, members
      before dependents, families in ``groups`` order): ``a_tp`` is that member's axis —
      ``query``/``key``/``value`` on their head axis, the attention output on its head
      (input) axis, ``gate``/``up`` on their neuron axis, ``down`` on its neuron (input)
      axis;
    * any other leaf of two or more dimensions (an embedding): ``a_tp = argmax_a shape[a]``
      (the vocabulary: Megatron's vocabulary-parallel embedding);
    * every leaf of two or more dimensions: ``a_fsdp = argmax_{a ≠ a_tp} shape[a]`` (the
      model width); vectors outside the groups (norm scales, biases) are replicated.

    Every sharded size must divide by its mesh axis; `jax.device_put` says which does not.

    Args:
      tree: the parameter pytree (arrays or anything with ``.shape``/``.ndim``).
      groups: the groups of ``tree`` (paths as `tree_paths` spells them).
      tp: the tensor-parallel mesh axis name.
      fsdp: the data/FSDP mesh axis name, or ``None`` for tensor parallel only.

    Returns:
      A pytree of `jax.sharding.PartitionSpec` with ``tree``'s structure.

    Example:
      >>> import jax.numpy as jnp, hesso_jax as hj
      >>> params = {"up": jnp.zeros((8, 16)), "down": jnp.zeros((16, 8)),
      ...           "scale": jnp.ones(8)}
      >>> groups = hj.Groups.from_families([hj.GroupFamily(
      ...     16, (hj.Member(("up",), 1),), (hj.Member(("down",), 0),), name="neurons")])
      >>> specs = hj.tensor_parallel_specs(params, groups)
      >>> specs["up"], specs["down"], specs["scale"]
      (P('fsdp', 'tp'), P('tp', 'fsdp'), P(None,))
    """
    tp_axis: dict[tuple, int] = {}
    for fam in groups.families:
        for m in (*fam.members, *fam.dependents):
            tp_axis.setdefault(m.path, m.axis)

    def spec(path: tuple, x: Any) -> PartitionSpec:
        entries: list[str | None] = [None] * x.ndim
        if path in tp_axis:
            entries[tp_axis[path] % x.ndim] = tp
        elif x.ndim >= 2:  # not prunable (an embedding): its largest axis over tp
            entries[int(np.argmax(x.shape))] = tp
        free = [a for a in range(x.ndim) if entries[a] is None]
        if fsdp is not None and x.ndim >= 2 and free:
            entries[max(free, key=lambda a: x.shape[a])] = fsdp
        return PartitionSpec(*entries)

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [spec(p, x) for p, x in zip(tree_paths(tree), leaves, strict=True)])
