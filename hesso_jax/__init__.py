"""hesso_jax: train and structurally prune any JAX/Flax network in one run.

The pipeline, one module per concept::

    model ──discover_groups──▶ Groups ──hesso / cric──▶ exact zero groups ──shrink──▶ small model
    (nnx / linen / equinox /   (families of    (optax transformation,     (masked == shrunk,
     haiku / pure fn + input)   zero-invariant   last in the chain; or      verified by running)
                                slices, costs)   one-shot / SNOWS)

1. `discover_groups` (``discovery``, on the jaxpr interpreter in ``jaxpr/``) finds the
   zero-invariant groups and records their parameter / FLOP `GroupCosts` (``costs``).
   `Groups`, `GroupFamily` and `Member` (``groups``) also build them by hand.
2. `hesso` (``hesso``; saliency scores in ``saliency``, the projection in ``projection``,
   the placement checks in ``placement``) trains and projects the least salient groups to
   exactly zero; `CricConfig` / `cric` (``cric``) corrects the selection; `Budget`
   (``budget``) asks for a params / FLOPs fraction instead of a group count.
   `hesso_status` reads where a run stands; `check_faults` raises what a
   ``hesso(..., on_fault="record")`` run recorded.
3. `shrink`, `shrink_model`, `shrink_opt_state`, `KeepPlan` (``surgery``, framework
   adapters in ``frameworks/``) cut the zero groups out and check the result numerically.
4. One-shot alternatives: `snows` (``snows``, Newton–CG in ``newton``) and
   ``baselines.one_shot_prune``.

Support code, outside the core: ``models/`` (reference models: CNN, ResNet, transformer,
BERT-like, MiniLM, Llama, CARN, char-LM), ``data``/``text`` (bundled data sets),
``train`` (the training recipe the benchmarks and notebooks share) and ``cli`` (the
``hesso-jax`` command).

Example:
  >>> import jax.numpy as jnp, optax, hesso_jax as hj
  >>> fam = hj.GroupFamily(4, (hj.Member(("w",), 1),))
  >>> groups = hj.Groups.from_families([fam])
  >>> params = {"w": jnp.array([[1.0, 0.1, 2.0, 0.2]])}
  >>> tx = optax.chain(optax.sgd(0.0), hj.hesso(groups, 2, P=1, Tp=2))
  >>> state = tx.init(params)
  >>> for _ in range(2):
  ...     updates, state = tx.update({"w": jnp.zeros((1, 4))}, state, params)
  ...     params = optax.apply_updates(params, updates)
  >>> params["w"].tolist(), hj.hesso_status(state).num_pruned
  ([[1.0, 0.0, 2.0, 0.0]], 2)
"""

from hesso_jax.budget import Budget, budget_select, resolve_budget
from hesso_jax.costs import GroupCosts, group_costs
from hesso_jax.cric import CricConfig, CricResult, cric
from hesso_jax.discovery import DiscoveryWarning, discover_groups
from hesso_jax.frameworks import check_shrinkable
from hesso_jax.groups import GroupFamily, Groups, Member, tree_paths
from hesso_jax.hesso import HessoState, HessoStatus, check_faults, hesso, hesso_status
from hesso_jax.saliency import SCORES
from hesso_jax.sharding import tensor_parallel_specs
from hesso_jax.snows import GroupMask, SnowsReport, snows
from hesso_jax.surgery import (
    KeepPlan,
    apply_plan,
    shrink,
    shrink_groups,
    shrink_model,
    shrink_opt_state,
)

__version__ = "0.1.0"

__all__ = [
    "SCORES",
    "Budget",
    "CricConfig",
    "CricResult",
    "DiscoveryWarning",
    "GroupCosts",
    "GroupFamily",
    "GroupMask",
    "Groups",
    "HessoState",
    "HessoStatus",
    "KeepPlan",
    "SnowsReport",
    "Member",
    "apply_plan",
    "budget_select",
    "check_faults",
    "check_shrinkable",
    "cric",
    "discover_groups",
    "group_costs",
    "hesso",
    "hesso_status",
    "resolve_budget",
    "shrink",
    "shrink_groups",
    "shrink_model",
    "shrink_opt_state",
    "snows",
    "tensor_parallel_specs",
    "tree_paths",
]
