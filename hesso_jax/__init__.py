"""hesso_jax: train and structurally prune any JAX/Flax network in one run.

Public API (see ``shared/design.md``): `discover_groups`, `Groups`, `GroupFamily`,
`Member`, `hesso`, `hesso_status`, `cric`, `CricConfig`, `shrink`, `shrink_model`,
`shrink_opt_state`, `KeepPlan`, `check_shrinkable`, `snows`, `GroupMask`, `Budget`,
`group_costs`, `GroupCosts`.
"""

from hesso_jax.budget import Budget, budget_select, resolve_budget
from hesso_jax.costs import GroupCosts, group_costs
from hesso_jax.cric import CricConfig, CricResult, cric
from hesso_jax.discovery import DiscoveryWarning, discover_groups
from hesso_jax.frameworks import check_shrinkable
from hesso_jax.groups import GroupFamily, Groups, Member, tree_paths
from hesso_jax.hesso import HessoState, HessoStatus, hesso, hesso_status
from hesso_jax.saliency import SCORES
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
    "tree_paths",
]
