"""Model surgery per framework: a smaller model object whose static sizes fit its shapes.

`hesso_jax.surgery` shrinks parameter trees; this package turns a shrunk tree back into a
model of the user's framework and checks it by running:

* ``nnx.py``: Flax NNX modules (also linen modules wrapped by ``nnx.bridge.ToNNX``);
* ``equinox.py``: equinox modules (also the static fields of trees `hesso_jax.shrink`
  returns);
* ``linen.py``: Flax linen modules (cloned with new size attributes);
* ``verify.py``: masked vs shrunk on an example input, naming the first layer that differs.

Haiku builds its modules inside the transformed function, so there is no module object to
resize: write the function to take its sizes from the parameter shapes (``w.shape[-1]``)
and use `hesso_jax.shrink` on the params, or rebuild the function with the new sizes
(see the README and ``tests/interop/test_haiku.py``).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import flax.nnx
import numpy as np

from hesso_jax.frameworks import linen as _linen
from hesso_jax.frameworks import nnx as _nnx
from hesso_jax.groups import Groups
from hesso_jax.surgery import KeepPlan

__all__ = ["check_shrinkable", "shrink_model"]


def _framework(model: Any) -> str:
    if isinstance(model, flax.nnx.Module):
        return "nnx"
    import flax.linen as nn

    if isinstance(model, nn.Module):
        return "linen"
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(model, eqx.Module):
        return "equinox"
    raise TypeError(
        "shrink_model takes an nnx.Module, an equinox Module or a linen Module (with "
        f"variables=), got {type(model).__name__}; for a parameter tree use hj.shrink")


def shrink_model(model: Any, groups: Groups, *inputs: Any, variables: Any = None,
                 example: Any = None, verify: bool = True, plan: KeepPlan | None = None,
                 round_to: int = 1, tolerance: float | None = None) -> Any:
    """A new, smaller model that computes what ``model`` (with its zero groups) does.

    The model's tree (NNX: the whole ``nnx.state``, BatchNorm statistics included;
    equinox: its arrays; linen: ``variables``) is cut by `hesso_jax.shrink`, and the
    framework's layers get static sizes that fit the new shapes:

    * **NNX** (`hesso_jax.frameworks.nnx`): ``Linear``, ``LinearGeneral``, ``Conv``
      (``feature_group_count`` of grouped and depthwise convs, see
      `hesso_jax.frameworks.common.grouped_conv_count`), ``ConvTranspose``,
      ``BatchNorm``/``LayerNorm``/``RMSNorm``, ``GroupNorm`` (whole groups), ``Embed``,
      ``MultiHeadAttention`` (whole heads), ``GRUCell``/``OptimizedLSTMCell``/
      ``SimpleCell``/``LSTMCell`` (so ``nnx.RNN`` runs), and linen modules inside
      ``nnx.bridge.ToNNX`` (resized as below; needs the example input). A Flax layer
      without a rule whose variables changed shape raises. Returns the module.
    * **equinox** (`hesso_jax.frameworks.equinox`): ``Linear``, ``Conv*``,
      ``ConvTranspose*``, ``MultiheadAttention``, ``GroupNorm``, ``LayerNorm``,
      ``RMSNorm``, ``GRUCell``, ``LSTMCell``, ``Embedding``, ``MLP``. Returns the module.
    * **linen** (`hesso_jax.frameworks.linen`): pass ``variables=``; the module is
      cloned with new size attributes (``Dense.features``, ``Conv.features``/
      ``feature_group_count``, ``DenseGeneral.features``, ``Embed``,
      ``MultiHeadDotProductAttention.num_heads``/``qkv_features``/``out_features``,
      ``GroupNorm.num_groups``) found through its fields; needs the example input.
      Returns ``(new_module, new_variables)``.

    **Verified by running**: given an example input (``*inputs``, ``example=``, or one
    discovery recorded on ``groups`` as ``groups.example_inputs``), the masked model (the
    removed groups' members set to 0) and the shrunk one run on it, and a ValueError names
    the first layer whose output differs (tolerance: 1e-5 of the output's scale for
    float32, see `hesso_jax.frameworks.verify`) or that raised. Without an example only the
    static checks run. ``verify=False`` skips the run.

    Re-applying a plan: ``shrink_model(fresh, groups, plan=KeepPlan.from_json(text))``
    rebuilds the small architecture from a fresh model whose removed groups are zero; for
    a structure-only rebuild of a random initialisation pass ``tolerance=math.inf`` and
    load the small checkpoint afterwards.

    Args:
      model: the model (not modified; the result shares no variables with it).
      groups: the `Groups` over the model tree's paths.
      *inputs: example call arguments (arrays or ``jax.ShapeDtypeStruct``).
      variables: linen only: the variables (``{'params': ..., 'batch_stats': ...}``).
      example: the example as a tuple of call arguments (instead of ``*inputs``).
      verify: check the result by running when an example input is available.
      plan: a `KeepPlan` to apply instead of detecting zero groups (checked, see
        `hesso_jax.shrink`).
      round_to: round each family's kept count up to a multiple of this.
      tolerance: largest ``|x|`` counted as zero (``None``: exactly zero).

    Returns:
      The smaller model (linen: ``(module, variables)``).

    Raises:
      ValueError: from `hesso_jax.shrink`, when a layer's static sizes cannot be made to
        fit its new shapes (naming the module path and attribute), or when verification
        fails (naming the first layer whose output differs).
      TypeError: for a model of no supported framework.

    Example:
      >>> import jax.numpy as jnp, numpy as np, hesso_jax as hj
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fc1, self.fc2 = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.fc2(nnx.relu(self.fc1(x)))
      >>> model, x = Net(nnx.Rngs(0)), jnp.ones((3, 4))
      >>> groups = hj.discover_groups(model, x)
      >>> model.fc1.kernel[...] = model.fc1.kernel[...].at[:, :2].set(0.0)
      >>> model.fc1.bias[...] = model.fc1.bias[...].at[:2].set(0.0)
      >>> small = hj.shrink_model(model, groups, x)      # verified on x
      >>> small.fc1.out_features, small.fc2.in_features
      (4, 4)
    """
    kind = _framework(model)
    options = dict(example=example, verify=verify, plan=plan, round_to=round_to,
                   tolerance=tolerance)
    if kind == "linen":
        if variables is None:
            raise TypeError("shrink_model(linen_module, groups, x, variables=variables): "
                            "a linen module needs its variables")
        return _linen.shrink_model(model, groups, *inputs, variables=variables, **options)
    if variables is not None:
        raise TypeError(f"variables= is for linen modules; an {kind} model holds its own")
    if kind == "nnx":
        return _nnx.shrink_model(model, groups, *inputs, **options)
    from hesso_jax.frameworks import equinox as _equinox

    return _equinox.shrink_model(model, groups, *inputs, **options)


def probe_plan(groups: Groups, seed: int = 0) -> KeepPlan:
    """A plan that removes one (seeded random) group of every family with two or more."""
    rng = np.random.default_rng(seed)
    keep = np.ones(groups.num_groups, bool)
    for fam, start in zip(groups.families, groups.starts, strict=True):
        if fam.size > 1:
            keep[start + int(rng.integers(fam.size))] = False
    return KeepPlan.from_mask(groups, keep)


def check_shrinkable(model: Any, groups: Groups, *inputs: Any, variables: Any = None,
                     example: Any = None) -> None:
    """Raises *before training* if surgery could not shrink ``model`` over ``groups``.

    Runs `shrink_model` with a probe plan that removes one random group of every family
    with at least two (`probe_plan`, removed groups' members treated as zero), so every
    layer a family touches goes through its framework rule; with an example input the
    probe is also verified by running. Surgery depends only on which groups are removed,
    never on the trained values, so a model that passes can be shrunk after training
    whichever groups HESSO removes, except for rules about a family's pattern (a
    GroupNorm or grouped conv that must lose whole groups), which the probe exercises.

    Args:
      model: an NNX, equinox or linen model (as `shrink_model` takes it).
      groups: its groups (e.g. from `hesso_jax.discover_groups`).
      *inputs: example call arguments (recommended; linen and ``nnx.bridge`` need them).
      variables: linen only: the variables.
      example: the example as a tuple of call arguments.

    Raises:
      ValueError: naming the module path and attribute that surgery cannot handle.
      TypeError: for a model of no supported framework.

    Example:
      >>> import jax.numpy as jnp, hesso_jax as hj
      >>> from flax import nnx
      >>> model, x = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.relu,
      ...                           nnx.Linear(6, 2, rngs=nnx.Rngs(1))), jnp.ones((3, 4))
      >>> hj.check_shrinkable(model, hj.discover_groups(model, x), x)
    """
    try:
        shrink_model(model, groups, *inputs, variables=variables, example=example,
                     plan=probe_plan(groups), tolerance=math.inf)
    except ValueError as e:
        raise ValueError(f"check_shrinkable: {e}") from e
