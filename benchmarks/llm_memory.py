"""Per-device memory of a Llama's parameters + Adam + HESSO state under FSDP x TP meshes.

Measured, not modelled: for each mesh ``(fsdp, tp)`` of 1, 2, 4 and 8 (virtual CPU)
devices the parameters are laid out with `tp_specs` (the pruned axes, kv heads with their
query heads and SwiGLU neurons, and the embedding's vocabulary over ``"tp"``; each
weight's largest other axis, the model width, over ``"fsdp"``; RMSNorm scales
replicated), the state of
``optax.chain(optax.adam(lr), hj.hesso(groups, ...))`` is built by ``jax.jit(tx.init)``
under an ``AxisType.Explicit`` mesh (so Adam's moments take their parameters' sharding),
and the bytes of every array's ``addressable_shards`` are summed per device. The reported
figure is the largest device's (the table also checks all devices hold the same).

The same arithmetic the 7 B projection in ``docs/multihost.md`` uses is evaluated for this
model and printed next to the measurement (``model`` columns):

    bytes/device = N_sharded · (b_param + 2·b_moment) / (fsdp·tp)
                 + N_replicated · (b_param + 2·b_moment)
                 + G · (1 + 1 + 4) + c                       (HESSO: 2 bool[G] + f32[G])

with ``c`` HESSO's constant-size leaves (counters, schedule, probe, recorded fault:
``32 + 8·PROBE_SIZE + 4·FAULT_SIZE`` bytes). ``N_replicated`` is the RMSNorm scales.

Usage::

    python benchmarks/llm_memory.py                  # writes benchmarks/llm_memory.json
    python benchmarks/llm_memory.py --no-write --dtype bfloat16
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import hesso_jax as hj  # noqa: E402
from hesso_jax.hesso import HessoState  # noqa: E402
from hesso_jax.models.llama import LlamaConfig  # noqa: E402
from hesso_jax.placement import FAULT_SIZE, PROBE_SIZE  # noqa: E402

try:  # run as `python benchmarks/llm_memory.py`: the sibling module is importable
    from common import command_line, environment_line, parser
except ImportError:  # imported from elsewhere (tests)
    command_line = environment_line = parser = None  # type: ignore[assignment]

HERE = Path(__file__).resolve().parent
# 8 query / 4 kv heads (head_dim 32), 768 SwiGLU neurons, 4 layers: 3.21 M parameters,
# every pruned axis divisible by tp = 4.
CONFIG = LlamaConfig(vocab_size=256, d_model=256, num_layers=4, num_heads=8,
                     num_kv_heads=4, mlp_dim=768, max_len=128)
MESHES = ((1, 1), (1, 2), (2, 2), (2, 4), (8, 1))  # (fsdp, tp)
# Llama-2-7B's shapes (untied output head, multi-head attention), for the projection only.
LLAMA_7B = LlamaConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                       num_kv_heads=32, mlp_dim=11008, max_len=4096, tie_embeddings=False)
POD_MESHES = ((1, 8), (8, 8), (32, 8))  # (fsdp, tp): one 8-chip node, 64 and 256 chips
# bytes per parameter: (value, optimizer state) for the projected precisions
PRECISIONS = {"fp32 params + fp32 Adam": (4, 8),
              "bf16 params + fp32 master copy + fp32 Adam": (2, 12),
              "bf16 params + bf16 Adam": (2, 4)}
HESSO_BYTES_PER_GROUP = 1 + 1 + 4  # redundant: bool[G], pruned: bool[G], scores: f32[G]
# count, cric_cycles, probe_key, cric_rejected: int32; schedule: int32[4]; probe: uint32[S];
# probe_tol: float32[S] with S = PROBE_SIZE; fault: int32[FAULT_SIZE]
HESSO_CONST_BYTES = 4 * 4 + 16 + 8 * PROBE_SIZE + 4 * FAULT_SIZE


tp_specs = hj.tensor_parallel_specs  # the layout rule (hesso_jax/sharding.py)


def abstract_model(config: LlamaConfig, dtype: Any) -> tuple[Any, Any, hj.Groups]:
    """``(graphdef, params, groups)``: the model's parameters as host numpy arrays.

    Built with ``nnx.eval_shape`` (no initialiser compiled) and filled with a seeded
    normal draw: memory depends on shapes and dtypes only. The groups are the model's
    hand-written ones (``Llama.groups``, what discovery finds on it, `tests/test_llama.py`).
    """
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(dtype),
                          state)
    return graphdef, params, model.groups()


def device_bytes(tree: Any) -> dict[Any, int]:
    """``{device: bytes}`` of ``tree``'s arrays' addressable shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def measure(config: LlamaConfig, fsdp: int, tp: int, dtype: Any = jnp.float32,
            cric: bool = False) -> dict[str, Any]:
    """Per-device bytes of parameters, Adam's state and HESSO's state on one mesh.

    Returns a dict with the mesh, the largest and smallest device total per part and the
    arithmetic model's prediction (``model_*``).
    """
    _, host, groups = abstract_model(config, dtype)
    mesh = jax.make_mesh((fsdp, tp), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2,
                         devices=jax.devices()[:fsdp * tp])
    tx = optax.chain(optax.adam(1e-3), hj.hesso(
        groups, 0.25, 2, 10, cric=hj.CricConfig(2, 0.01) if cric else None))
    specs = tp_specs(host, groups)
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda a, s: jax.make_array_from_callback(
            a.shape, NamedSharding(mesh, s), lambda idx: a[idx]), host, specs)
        state = jax.jit(tx.init)(params)
    adam = state[0]
    hesso = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, HessoState)) if isinstance(s, HessoState))
    parts = {"params": params, "adam": adam, "hesso": hesso}
    row: dict[str, Any] = {"devices": fsdp * tp, "fsdp": fsdp, "tp": tp,
                           "dtype": jnp.dtype(dtype).name, "params_count": int(sum(
                               np.size(x) for x in jax.tree.leaves(host))),
                           "groups": groups.num_groups}
    totals = None
    for name, tree in parts.items():
        per = device_bytes(tree)
        row[f"{name}_bytes_max"] = max(per.values())
        row[f"{name}_bytes_min"] = min(per.values())
        totals = per if totals is None else {d: totals[d] + per[d] for d in per}
    row["total_bytes_max"] = max(totals.values())
    row["total_bytes_min"] = min(totals.values())
    row.update(model_bytes(host, specs, groups, fsdp, tp, jnp.dtype(dtype).itemsize))
    return row


def model_bytes(host: Any, specs: Any, groups: hj.Groups, fsdp: int, tp: int,
                itemsize: int) -> dict[str, Any]:
    """The arithmetic model's per-device bytes (the module docstring's formula)."""
    sharded = replicated = 0
    for x, s in zip(jax.tree.leaves(host), jax.tree.leaves(
            specs, is_leaf=lambda v: isinstance(v, PartitionSpec)), strict=True):
        if any(e is not None for e in s):
            sharded += x.size
        else:
            replicated += x.size
    per_param = 3 * itemsize  # value + Adam's mu and nu, all in the parameters' dtype
    params_adam = sharded * per_param // (fsdp * tp) + replicated * per_param + 4  # + count
    hesso = HESSO_BYTES_PER_GROUP * groups.num_groups + HESSO_CONST_BYTES
    return {"model_bytes": int(params_adam + hesso), "model_hesso_bytes": int(hesso),
            "sharded_params": int(sharded), "replicated_params": int(replicated)}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of `measure` rows (MiB = 2^20 bytes)."""
    mib = 2.0 ** 20
    lines = ["| devices | fsdp × tp | params | Adam (μ, ν) | HESSO | total / device | "
             "formula | 1-device total ÷ this |",
             "|---:|:---:|---:|---:|---:|---:|---:|---:|"]
    one = next(r["total_bytes_max"] for r in rows if r["devices"] == 1)
    for r in rows:
        assert r["total_bytes_max"] == r["total_bytes_min"], r  # balanced layout
        lines.append(
            f"| {r['devices']} | {r['fsdp']} × {r['tp']} | {r['params_bytes_max'] / mib:.3f} "
            f"MiB | {r['adam_bytes_max'] / mib:.3f} MiB | {r['hesso_bytes_max'] / 1024:.2f} "
            f"KiB | {r['total_bytes_max'] / mib:.3f} MiB | "
            f"{r['model_bytes'] / mib:.3f} MiB"
            f"{' (exact)' if r['model_bytes'] == r['total_bytes_max'] else ''} | "
            f"{one / r['total_bytes_max']:.2f} |")
    return "\n".join(lines)


def projection(config: LlamaConfig = LLAMA_7B) -> tuple[str, dict[str, Any]]:
    """The formula evaluated for ``config``'s shapes on `POD_MESHES` (nothing allocated).

    Shapes come from ``nnx.eval_shape`` of the model, the groups from ``Llama.groups``;
    every matrix is sharded over both axes by `tp_specs` (sizes must divide), the RMSNorm
    scales are replicated. Returns the markdown table and its numbers.
    """
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    shapes = nnx.state(model, nnx.Param)
    n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
    n_rep = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes) if len(x.shape) < 2))
    g = model.groups().num_groups
    hesso = HESSO_BYTES_PER_GROUP * g + HESSO_CONST_BYTES
    heads = " | ".join(f"{f * t} chips ({f} × {t})" for f, t in POD_MESHES)
    lines = [f"| precision (bytes/param) | total | {heads} |",
             "|:---|---:|" + "---:|" * len(POD_MESHES)]
    out: dict[str, Any] = {"params": n, "replicated_params": n_rep, "groups": g,
                           "hesso_bytes": hesso, "rows": {}}
    for name, (value, opt) in PRECISIONS.items():
        per = value + opt
        chips = [((n - n_rep) * per) / (f * t) + n_rep * per + hesso + 4
                 for f, t in POD_MESHES]
        out["rows"][name] = {"total_bytes": n * per, "per_chip_bytes": chips}
        cells = " | ".join(f"{b / 1e9:.3f} GB" for b in chips)
        lines.append(f"| {name} ({per}) | {n * per / 1e9:.2f} GB | {cells} |")
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=HERE)
    p.add_argument("--dtype", default="float32,bfloat16",
                   help="comma-separated parameter dtypes (Adam's moments follow them)")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"command": command_line("llm_memory.py", argv),
                               "environment": environment_line(),
                               "config": CONFIG.to_dict(), "tables": {}}
    for name in args.dtype.split(","):
        rows = [measure(CONFIG, f, t, jnp.dtype(name)) for f, t in MESHES]
        results["tables"][name] = rows
        print(f"\n{name} parameters, {rows[0]['params_count']:,} parameters, "
              f"G = {rows[0]['groups']}:\n{table(rows)}")
    cric = measure(CONFIG, 2, 4, jnp.float32, cric=True)
    results["cric_2x4_float32"] = cric
    print(f"\nHESSO-CRIC on 2 × 4: HESSO state {cric['hesso_bytes_max']} B per device "
          "(the same HessoState; CRIC's trial iterate is transient)")
    text, results["projection_7b"] = projection()
    proj = results["projection_7b"]
    print(f"\nProjection, Llama-2-7B shapes: N = {proj['params']:,}, G = {proj['groups']:,}, "
          f"HESSO state {proj['hesso_bytes']:,} B per chip:\n{text}")
    if not args.no_write:
        (args.out / "llm_memory.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
