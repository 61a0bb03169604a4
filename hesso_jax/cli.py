"""The ``hesso-jax`` command.

``hesso-jax demo`` trains the reference CNN on scikit-learn's bundled digits twice from the
same initialisation and batches — densely with Adam, and with
``optax.chain(optax.adam, hj.hesso(...))`` at the requested group sparsity (or, with
``--flops`` / ``--params``, a `hesso_jax.Budget`: a fraction of the dense FLOPs or
parameters) — then shrinks the pruned model, prints a comparison table and writes the
shrunk checkpoint (orbax), the groups and keep-plan (JSON), the results (JSON, with the
kept params / FLOPs fractions) and a plot (PNG) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block.

    Every error starts with ``hesso-jax: error:``, whichever sub-command raised it.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message, 2)


def _fail(message: str, status: int) -> None:
    """Writes ``hesso-jax: error: <message>`` (one line) to stderr and exits."""
    _error(message)
    raise SystemExit(status)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hesso-jax")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def _int_at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _min_keep(text: str) -> int | float:
    """An int count >= 0, or a fraction strictly between 0 and 1."""
    try:
        return _int_at_least(0)(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a count >= 0 or a fraction in (0, 1), got {text!r}") from None


class _UsageError(Exception):
    """Arguments that parse but do not fit together (reported like a parse error)."""


class _LateError(Exception):
    """A step after the results were written failed (one line, exit status 1)."""


PROG = "hesso-jax"
_OUTPUTS = ("results.json", "groups.json", "keep_plan.json", "training.png")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every option's help names its default)."""
    parser = _Parser(prog=PROG, description="Train and structurally prune JAX "
                     "networks in one run (HESSO).")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo", help="train the digits CNN densely and with HESSO, shrink, compare",
        description="Train the reference CNN on scikit-learn digits densely and with HESSO "
        "on the same step budget, shrink the pruned model, print a table and save the "
        "shrunk checkpoint, plan and a plot.")
    target = demo.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_fraction, default=0.5,
                        help="fraction of groups to prune, in (0, 1) (default: 0.5)")
    target.add_argument("--flops", type=_fraction, default=None,
                        help="instead of a group sparsity: keep at most this fraction of the "
                             "dense FLOPs, in (0, 1), as K=hj.Budget(flops=...) "
                             "(default: none, the sparsity applies)")
    target.add_argument("--params", type=_fraction, default=None,
                        help="instead of a group sparsity: keep at most this fraction of the "
                             "dense parameters, in (0, 1), as K=hj.Budget(params=...) "
                             "(default: none, the sparsity applies)")
    demo.add_argument("--steps", type=_int_at_least(20), default=1500,
                      help="training steps of each run, at least 20 (default: 1500)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0,
                      help="random seed of the initialisation, split and batches (default: 0)")
    demo.add_argument("--out", type=Path, default=Path("hesso_demo_out"),
                      help="output folder (default: ./hesso_demo_out)")
    demo.add_argument("--batch-size", type=_int_at_least(1), default=64,
                      help="training batch size (default: 64)")
    demo.add_argument("--lr", type=_positive_float, default=3e-3,
                      help="Adam learning rate (default: 0.003)")
    demo.add_argument("--periods", type=_int_at_least(1), default=5,
                      help="HESSO pruning periods P (default: 5)")
    demo.add_argument("--min-keep", type=_min_keep, default=0,
                      help="per-family floor: groups (int) or fraction of groups every "
                           "family keeps (default: 0, none)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide progress bars (default: shown)")
    return parser


def _check_out_dir(out: Path) -> Path:
    out = out.expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        _fail(f"cannot write to output folder {out}: {err.strerror or err}", 1)
    return out


_WORK = ".shrunk_checkpoint.tmp"  # the checkpoint is written inside this folder


def _clean_stale(out: Path) -> list[str]:
    """Removes what an interrupted or killed earlier run left in ``out``; returns the names.

    Only this command's own temporary names are touched: the checkpoint work folder (with
    any orbax temporary folder inside it), the set-aside old checkpoint (put back if the run
    was killed between the two renames of the swap), the ``.NAME.tmp`` files of
    `_write_atomic` for the demo's outputs and the write test's ``.write-test-*`` files.
    Finished outputs stay.
    """
    import shutil

    old = out / ".shrunk_checkpoint.old"
    if old.is_dir() and not (out / "shrunk_checkpoint").exists():
        os.replace(old, out / "shrunk_checkpoint")
    stale = [out / _WORK, old, *(out / f".{name}.tmp" for name in _OUTPUTS),
             *sorted(out.glob(".write-test-*"))]
    removed = []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path.name)
    return removed


def _save_checkpoint(out: Path, state: Any) -> Path:
    """Writes ``state`` with orbax, checks that it restores equal, then moves it into place.

    orbax writes into ``out/.shrunk_checkpoint.tmp/`` (its own temporary folders land
    there too); the result is restored against the abstract state (``jax.eval_shape``, as a
    user restores into ``nnx.eval_shape(...)``) and compared leaf by leaf, bit for bit.
    Only then is it renamed to ``out/shrunk_checkpoint``. An interruption (Ctrl-C,
    pre-emption, a full disk) or a failed check leaves the previous ``shrunk_checkpoint``
    (if any) untouched and removes the work folder: there is never a half-written
    checkpoint under the final name. The swap is two renames on the same file system (the
    old checkpoint is moved aside first, then deleted).

    Raises:
      RuntimeError: if the restored state differs from ``state``.
    """
    import shutil

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    final, work, old = out / "shrunk_checkpoint", out / _WORK, out / ".shrunk_checkpoint.old"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(work / "ckpt", state)
            ckpt.wait_until_finished()
            restored = ckpt.restore(work / "ckpt", jax.eval_shape(lambda: state))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise RuntimeError("the checkpoint does not restore to the saved state")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(work / "ckpt", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, write: Any) -> None:
    """Calls ``write(tmp_path)`` for a temporary file next to ``path``, then renames it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _plot(path: Path, dense: Any, pruned: Any, num_groups: int, target: int,
          schedule: tuple[int, int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warmup, periods, period_len = schedule
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(dense.steps, [100 * a for a in dense.test_accuracy], label="dense (Adam)")
    ax1.plot(pruned.steps, [100 * a for a in pruned.test_accuracy], label="HESSO")
    ax1.set_xlabel("step")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(bottom=max(0, min(pruned.test_accuracy + dense.test_accuracy) * 100 - 5))
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(pruned.steps, pruned.zero_groups, color="C1")
    ax2.axhline(target, color="grey", ls="--", label=f"K = {target} of {num_groups}")
    for p in range(periods + 1):
        ax2.axvline(warmup + p * period_len, color="grey", alpha=0.2)
    ax2.set_xlabel("step")
    ax2.set_ylabel("groups exactly 0.0")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle("hesso-jax demo: digits CNN")
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


@dataclasses.dataclass
class _Runs:
    """The two trained models of the demo and what the HESSO run reports."""

    data: Any
    groups: Any
    dense: Any
    pruned: Any
    h_dense: Any
    h_hesso: Any
    status: Any
    zero: Any
    schedule: tuple[int, int, int]  # (warm-up, periods, period length)


def _train_both(args: argparse.Namespace) -> _Runs:
    """Trains the CNN densely and with HESSO from one initialisation and batch order."""
    import optax
    from flax import nnx

    import hesso_jax as hj
    from hesso_jax.data import load_digits_split
    from hesso_jax.models import CNN
    from hesso_jax.train import demo_schedule, train_classifier

    data = load_digits_split(seed=args.seed)
    warmup, period_len = demo_schedule(args.steps, args.periods)
    dense = CNN(rngs=nnx.Rngs(args.seed))
    pruned = CNN(rngs=nnx.Rngs(args.seed))  # identical initialisation
    # zero-invariant groups found from the model's jaxpr (no hand-written groups)
    groups = hj.discover_groups(pruned, data.x_train[:1])
    try:
        pruner = hj.hesso(groups, _target(args), args.periods, period_len,
                          warmup_steps=warmup, total_steps=args.steps,
                          min_keep=args.min_keep)
    except ValueError as err:  # e.g. --sparsity or a budget too high for --min-keep
        raise _UsageError(str(err)) from None
    _say(f"training the digits CNN densely and with HESSO ({args.steps} steps each)")
    common = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                  eval_every=max(1, args.steps // 60), progress=not args.no_progress)
    _, _, h_dense = train_classifier(dense, optax.adam(args.lr), data, desc="dense ",
                                     **common)
    _, opt_state, h_hesso = train_classifier(pruned, optax.chain(optax.adam(args.lr), pruner),
                                             data, groups=groups, desc="HESSO ", **common)
    status = hj.hesso_status(opt_state)
    zero = groups.zero_groups(nnx.state(pruned, nnx.Param))
    expected = status.num_pruned if status.budget is not None else status.target
    if int(zero.sum()) != expected or status.num_pruned != expected:
        raise RuntimeError(f"expected exactly {expected} zero groups, found "
                           f"{int(zero.sum())} (state says {status.num_pruned})")
    return _Runs(data, groups, dense, pruned, h_dense, h_hesso, status, zero,
                 (warmup, args.periods, period_len))


def _measure(runs: _Runs, small: Any) -> dict[str, Any]:
    """Accuracy, size, FLOPs, latency of dense/masked/shrunk and the masked-vs-shrunk gap."""
    import jax
    import numpy as np
    from flax import nnx

    from hesso_jax.train import count_params, evaluate, forward_flops, latency_ratio, make_eval

    data, dense, pruned = runs.data, runs.dense, runs.pruned
    x_test = jax.numpy.asarray(data.x_test)
    masked_logits = np.asarray(make_eval(pruned)(nnx.state(pruned), x_test))
    small_logits = np.asarray(make_eval(small)(nnx.state(small), x_test))
    flops = {"dense": forward_flops(dense, data.x_test[:1]),
             "shrunk": forward_flops(small, data.x_test[:1])}
    ratio, ms_small, ms_dense = latency_ratio(
        make_eval(small), nnx.state(small), make_eval(dense), nnx.state(dense), x_test)
    return {
        "test_accuracy": {"dense": evaluate(dense, data.x_test, data.y_test),
                          "hesso_masked": evaluate(pruned, data.x_test, data.y_test),
                          "hesso_shrunk": evaluate(small, data.x_test, data.y_test)},
        "shrunk_vs_masked_max_rel_logit_diff": float(
            np.max(np.abs(masked_logits - small_logits))
            / max(1e-12, float(np.max(np.abs(masked_logits))))),
        "params": {"dense": count_params(dense), "shrunk": count_params(small)},
        "flops_per_example": flops,
        "kept_fraction": {"params": count_params(small) / count_params(dense),
                          "flops": flops["shrunk"] / flops["dense"]},
        "latency_ms_test_batch": {"dense": ms_dense, "shrunk": ms_small,
                                  "ratio_shrunk_over_dense": ratio},
    }


def _print_table(args: argparse.Namespace, runs: _Runs, results: dict[str, Any]) -> None:
    """The comparison table on stdout."""
    acc, params = results["test_accuracy"], results["params"]
    flops, lat = results["flops_per_example"], results["latency_ms_test_batch"]
    rows = [
        ("test accuracy (%)", f"{100 * acc['dense']:.2f}", f"{100 * acc['hesso_shrunk']:.2f}"),
        ("parameters", f"{params['dense']:,}", f"{params['shrunk']:,}"),
        ("FLOPs / example", f"{flops['dense']:,.0f}", f"{flops['shrunk']:,.0f}"),
        (f"latency, {len(runs.data.x_test)} images (ms)", f"{lat['dense']:.3f}",
         f"{lat['shrunk']:.3f}"),
    ]
    print(f"\nhesso-jax demo — digits CNN, {args.steps} steps, seed {args.seed}, "
          f"{runs.status.num_pruned}/{runs.groups.num_groups} groups pruned "
          f"({_target_text(args)})")
    print(f"{'':34s}{'dense':>12s}{'HESSO shrunk':>14s}")
    for name, a, b in rows:
        print(f"{name:34s}{a:>12s}{b:>14s}")
    print(f"{'latency ratio shrunk/dense':34s}{'':>12s}{lat['ratio_shrunk_over_dense']:>14.3f}")
    kept = results["kept_fraction"]
    print(f"{'kept fraction: params / FLOPs':34s}{'':>12s}"
          f"{kept['params']:>6.3f} / {kept['flops']:.3f}")
    print(f"masked vs shrunk logits: max relative difference "
          f"{results['shrunk_vs_masked_max_rel_logit_diff']:.2e}", flush=True)


def _budget_args(args: argparse.Namespace) -> dict[str, float]:
    """``{'flops': f}`` or ``{'params': p}`` from ``--flops`` / ``--params`` (else empty)."""
    return {m: getattr(args, m) for m in ("params", "flops")
            if getattr(args, m, None) is not None}


def _target(args: argparse.Namespace) -> Any:
    """HESSO's K: ``hj.Budget(...)`` for ``--flops`` / ``--params``, else ``--sparsity``."""
    import hesso_jax as hj

    budget = _budget_args(args)
    return hj.Budget(**budget) if budget else args.sparsity


def _target_text(args: argparse.Namespace) -> str:
    budget = _budget_args(args)
    if not budget:
        return f"{100 * args.sparsity:.0f}% group sparsity"
    return ", ".join(f"budget: {100 * v:.0f}% of the dense {m}" for m, v in budget.items())


def _say(message: str) -> None:
    """One progress line on stderr (the table and the results go to stdout)."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _results(args: argparse.Namespace, runs: _Runs, metrics: dict[str, Any],
             t_start: float) -> dict[str, Any]:
    """The content of ``results.json`` (``checkpoint`` is None until it is saved)."""
    warmup, periods, period_len = runs.schedule
    return {
        "steps": args.steps, "seed": args.seed,
        "sparsity": None if _budget_args(args) else args.sparsity,
        "budget": _budget_args(args) or None,
        "groups": runs.groups.num_groups, "pruned_groups": int(runs.zero.sum()),
        "schedule": {"warmup": warmup, "periods": periods, "period_len": period_len},
        **metrics,
        "wall_seconds": time.perf_counter() - t_start,
        "checkpoint": None,
    }


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1)))


def _surgery(runs: _Runs, plan: Any, results: dict[str, Any], out: Path) -> Any:
    """The shrunk model; its measurements are added to ``results``."""
    import hesso_jax as hj

    try:
        small = hj.shrink_model(runs.pruned, runs.groups, plan=plan)
        results.update(_measure(runs, small))
    except Exception as err:
        raise _LateError(
            f"surgery failed ({type(err).__name__}: {err}); the training results are in "
            f"{out / 'results.json'}") from err
    return small


def _plot_and_checkpoint(out: Path, runs: _Runs, small: Any, results: dict[str, Any]) -> None:
    """Writes ``training.png`` and the checkpoint; names the checkpoint in ``results``."""
    from flax import nnx

    what = "training.png"
    try:
        _plot(out / what, runs.h_dense, runs.h_hesso, runs.groups.num_groups,
              runs.status.target, runs.schedule)
        what = "shrunk checkpoint"
        results["checkpoint"] = str(_save_checkpoint(out, nnx.state(small)))
    except Exception as err:
        raise _LateError(
            f"could not write the {what} ({type(err).__name__}: {err}); results.json, "
            f"groups.json and keep_plan.json in {out} are complete") from err


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo; returns the results written to ``results.json``.

    Order: clean what an interrupted earlier run left in ``--out``; train; write
    ``groups.json``, ``keep_plan.json`` and the training results (``results.json``);
    shrink and measure, rewrite ``results.json`` and print the table; only then the plot
    and the checkpoint (saved, restored and compared before it takes its final name),
    after which ``results.json`` names it. A failure after training keeps everything
    already written and is reported as one line (`_LateError`).
    """
    out = _check_out_dir(args.out)
    removed = _clean_stale(out)
    if removed:
        _say(f"removed {', '.join(removed)} left in {out} by an interrupted run")

    import hesso_jax as hj
    from hesso_jax.train import evaluate

    t_start = time.perf_counter()
    runs = _train_both(args)
    groups, data = runs.groups, runs.data
    plan = hj.KeepPlan.from_mask(groups, ~runs.zero)
    results = _results(args, runs, {"test_accuracy": {
        "dense": evaluate(runs.dense, data.x_test, data.y_test),
        "hesso_masked": evaluate(runs.pruned, data.x_test, data.y_test)}}, t_start)
    _write_atomic(out / "groups.json", lambda p: p.write_text(groups.to_json(indent=1)))
    _write_atomic(out / "keep_plan.json", lambda p: p.write_text(plan.to_json(indent=1)))
    _write_json(out / "results.json", results)
    # Surgery: a physically smaller model computing what the masked one does.
    small = _surgery(runs, plan, results, out)
    results["wall_seconds"] = time.perf_counter() - t_start
    _write_json(out / "results.json", results)
    _print_table(args, runs, results)
    _plot_and_checkpoint(out, runs, small, results)
    results["wall_seconds"] = time.perf_counter() - t_start
    _write_json(out / "results.json", results)
    print(f"wrote {out}/: results.json, groups.json, keep_plan.json, training.png, "
          f"shrunk_checkpoint/  ({results['wall_seconds']:.0f} s)")
    return results


def _schedule_fits(steps: int, periods: int) -> str | None:
    """None if the demo's HESSO schedule fits in ``steps``, else the reason (one line)."""
    from hesso_jax.train import demo_schedule

    warmup, period_len = demo_schedule(steps, periods)
    if warmup + periods * period_len <= steps:
        return None
    return (f"--periods {periods} does not fit in --steps {steps}: warm-up {warmup} + "
            f"{periods} periods x {period_len} step(s) = {warmup + periods * period_len} > "
            f"{steps}")


def _error(message: str) -> None:
    """``hesso-jax: error: <message>`` as one line on stderr."""
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hesso-jax``.

    Every error is one line on stderr starting with ``hesso-jax: error:``. Bad arguments
    exit with status 2; an output folder that cannot be written (at the start or later) and
    a failure after the results were written (plot, checkpoint) exit with status 1; Ctrl-C
    exits with 130. None of them leaves a half-written output file or checkpoint.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        reason = _schedule_fits(args.steps, args.periods)
        if reason is not None:
            parser.error(reason)
        try:
            run_demo(args)
        except _UsageError as err:
            parser.error(str(err))
        except KeyboardInterrupt:
            sys.stderr.write(f"{PROG}: interrupted\n")
            return 130
        except _LateError as err:
            _error(str(err))
            return 1
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            _error(f"cannot write output{where}: {err.strerror or err}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
