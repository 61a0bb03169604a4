"""A/B timing of two versions of ``hesso_jax/hesso.py`` in one process, interleaved.

Sequential runs of `step_cost.py` on two checkouts differ by about ±0.1× on these shared
2-core machines even for identical code (RESULTS.md, "Issue 14 targets, rerun"), which
hides most changes to the step. Here the working tree's ``hesso_jax/hesso.py`` (*new*)
and the one of a git revision (*old*, ``--ref``; loaded from ``git show`` as a second
module, ``hesso_jax.hesso_old``, beside the current one) build the same
`step_cost.py` case, and Adam, old and new are called in rotating rounds
(`step_cost.rotating_rounds`): ratios of medians over Adam's ordinary step, per kind.

Only ``hesso.py`` differs between the two: every other module (placement, saliency,
groups, …) is the working tree's for both, so this compares changes confined to
``hesso.py``, or the other modules' changes as seen through both versions.

Usage::

    python benchmarks/ab_hesso.py --ref HEAD~1 --models wide1e4,transformer
    python benchmarks/ab_hesso.py --ref 7abad11 --models wide1e3 --no-donate --rounds 11
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import step_cost as sc

import hesso_jax as hj

ROOT = Path(__file__).resolve().parents[1]


def load_old(ref: str) -> ModuleType:
    """``hesso_jax/hesso.py`` at git revision ``ref``, as the module ``hesso_jax.hesso_old``."""
    source = subprocess.run(["git", "show", f"{ref}:hesso_jax/hesso.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "hesso_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hesso_jax.hesso_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cases(model: sc.Model, old: ModuleType, variant: str, donate: bool) -> dict[str, sc.Case]:
    """Adam, and ``variant`` built by the old and by the new ``hesso``."""
    new_hesso = hj.hesso
    out = {"adam": sc.Case(model, "adam", donate)}
    try:
        hj.hesso = old.hesso  # `step_cost.Case` builds its transformation with hj.hesso
        out["old"] = sc.Case(model, variant, donate)
    finally:
        hj.hesso = new_hesso
    out["new"] = sc.Case(model, variant, donate)
    return out


def compare(built: dict[str, sc.Case], kinds: list[str], rounds: int, per_block: int
            ) -> dict[str, float]:
    """``{"old/kind": ratio, "new/kind": ratio}`` over Adam's ordinary step (medians of
    `step_cost.time_cases`)."""
    med = sc.time_cases(built, rounds, per_block, tuple(kinds))
    return {f"{v}/{k}": med[f"{v}/{k}"] / med["adam/ordinary"]
            for v in ("old", "new") for k in kinds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="git revision of the old hesso.py")
    parser.add_argument("--models", default="wide1e3,wide1e4,transformer")
    parser.add_argument("--variant", default="hesso base= record", choices=sorted(sc.VARIANTS))
    parser.add_argument("--kinds", default="ordinary,start1")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--no-donate", action="store_true")
    args = parser.parse_args(argv)
    old = load_old(args.ref)
    sc.STATE_CLASSES = (*sc.STATE_CLASSES, old.HessoState)  # sc.with_count sets both
    kinds = args.kinds.split(",")
    donate = not args.no_donate
    print(f"old: hesso.py at {args.ref}; new: the working tree; variant {args.variant!r}, "
          f"{'donated' if donate else 'not donated'}, {args.rounds} rounds\n")
    print("| model | kind | old | new |\n|---|---|---|---|")
    for name in args.models.split(","):
        model = sc.build(name)
        ratios = compare(cases(model, old, args.variant, donate), kinds, args.rounds,
                         args.per_block)
        for k in kinds:
            print(f"| {model.name} | {k} | {ratios[f'old/{k}']:.3f}× | "
                  f"{ratios[f'new/{k}']:.3f}× |", flush=True)


if __name__ == "__main__":
    main()
