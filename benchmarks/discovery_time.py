"""Group discovery time on a BERT-like encoder and a ResNet-18-sized CNN (CPU).

Times `hesso_jax.discover_groups` end to end (tracing the NNX model to a jaxpr plus the
analysis), then the analysis alone on the already-traced jaxpr, as the median of
``--repeats`` runs after one warm-up. Target: under 2 s per model on CPU.

    python benchmarks/discovery_time.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from common import HERE, command_line, environment_line, median_time, parser, publish
from flax import nnx

import hesso_jax as hj
from hesso_jax import discovery
from hesso_jax.groups import tree_paths
from hesso_jax.models import BertEncoder, ResNet


def _models():
    yield ("BERT-like encoder (6 layers, d=384, 12 heads, MLP 1536), 2x128 tokens",
           lambda: BertEncoder(vocab_size=30522, max_len=512, rngs=nnx.Rngs(0)),
           (jnp.ones((2, 128), jnp.int32),))
    yield ("ResNet-18 (64-128-256-512, 2-2-2-2 basic blocks), 2x224x224x3",
           lambda: ResNet(num_classes=1000, rngs=nnx.Rngs(0)),
           (jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=None)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    for name, build, inputs in _models():
        model = build()
        groups = hj.discover_groups(model, *inputs)
        total = median_time(lambda m=model, i=inputs: hj.discover_groups(m, *i), args.repeats)
        graphdef, state = nnx.split(model)
        closed, _ = discovery._trace(lambda st, *a, g=graphdef: nnx.merge(g, st)(*a), state,
                                     inputs, {})
        paths = tree_paths(state)
        trainable = [p in set(tree_paths(nnx.state(model, nnx.Param))) for p in paths]
        shapes = [tuple(x.shape) for x in jax.tree.leaves(state)]
        analysis = median_time(lambda c=closed, p=paths, t=trainable, s=shapes:
                               discovery._analyse(c, p, t, s, False), args.repeats)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        row = {"model": name, "params": int(n_params), "eqns": len(closed.jaxpr.eqns),
               "families": len(groups.families), "groups": groups.num_groups,
               "discover_s": total, "analysis_s": analysis}
        rows.append(row)
        print(f"{name}: {row['families']} families, G={row['groups']}, "
              f"discover {total:.3f} s (analysis {analysis:.3f} s)")
    lines = ["| model | params | top-level eqns | families | groups G | discover_groups (s) "
             "| analysis only (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['eqns']} | {r['families']} | "
                     f"{r['groups']:,} | {r['discover_s']:.3f} | {r['analysis_s']:.3f} |")
    body = (
        f"Command: `{command_line('discovery_time.py', argv)}` (median of {args.repeats} "
        f"runs after a warm-up; {environment_line()}). `discover_groups` = tracing the "
        "NNX model to a jaxpr + the analysis; the target is under 2 s per model.\n\n"
        + "\n".join(lines) + "\n\nFamilies found: BERT — per layer the 12 attention heads "
        "(query/key/value columns in blocks of 32, output-projection rows as dependents) and "
        "the 1536 MLP neurons; the residual width is LayerNorm'd and not prunable. "
        "ResNet-18 — the conv1 of every block, and one coupled family per stage (stem or "
        "projection shortcut + every block's conv2/BN, since the residual adds tie them).")
    publish(HERE, "## Group discovery time", body, results=rows,
            json_name="discovery_time.json", indent=2, write=not args.no_write)


if __name__ == "__main__":
    main()
