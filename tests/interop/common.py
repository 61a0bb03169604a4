"""Shared checks of the interop suite: models written with other libraries.

Per model: (a) discovered family sizes against hand-derived counts; (b) soundness without
rebuilding: a seeded random 30% of the groups have their members zeroed and their
dependents perturbed, and the output must not change; (c) masked == shrunk wherever a
shrunk model can run.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import hesso_jax as hj
from hesso_jax.frameworks.verify import masked_tree

RTOL = 1e-5


def discover(fn, *args):
    """``hj.discover_groups(fn, *args)`` and the warning messages it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = hj.discover_groups(fn, *args)
    return groups, [str(w.message) for w in caught]


def sizes(groups):
    return sorted(f.size for f in groups.families)


def removal(groups, seed=0, fraction=0.3):
    """``bool[G]`` keep mask: about ``fraction`` of each family removed, one group kept."""
    rng = np.random.default_rng(seed)
    keep = rng.random(groups.num_groups) >= fraction
    for fam, start in zip(groups.families, groups.starts, strict=True):
        seg = keep[start:start + fam.size]
        if fam.size > 1 and seg.all():
            seg[rng.integers(fam.size)] = False
        if not seg.any():
            seg[rng.integers(fam.size)] = True
    return keep


def zero_and_perturb(tree, groups, keep, seed=0):
    """Members of the removed groups set to 0; their dependents get random noise."""
    plan = hj.KeepPlan.from_mask(groups, keep)
    tree = masked_tree(tree, groups, plan)
    layout = groups.layout(tree, dependents="present")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    ext = jnp.concatenate([jnp.asarray(~keep, jnp.float32), jnp.zeros((1,))])
    rng = np.random.default_rng(seed)
    for m in layout.dependents:
        x = leaves[m.leaf]
        hit = jnp.broadcast_to(m.expand(ext), m.shape) > 0
        noise = jnp.asarray(rng.normal(size=m.shape) + 3.0, x.dtype)
        leaves[m.leaf] = jnp.where(hit, x + noise, x)
    return jax.tree_util.tree_unflatten(treedef, leaves), plan


def assert_close(got, want, what=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, what
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(g - w).max())
        assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"


def check_sound(fn, params, groups, args, seed=0):
    """(b): zeroed members + perturbed dependents leave ``fn(params, *args)`` unchanged.

    Returns the masked (unperturbed) params and the plan.
    """
    keep = removal(groups, seed)
    assert (~keep).sum() > 0
    plan = hj.KeepPlan.from_mask(groups, keep)
    masked = masked_tree(params, groups, plan)
    perturbed, _ = zero_and_perturb(params, groups, keep, seed)
    want = jax.jit(fn)(masked, *args)
    assert_close(jax.jit(fn)(perturbed, *args), want, "perturbed dependents")
    return masked, plan
