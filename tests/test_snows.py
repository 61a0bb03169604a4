"""SNOWS: masks, objective, Hessian-free Newton solver, capture through the jaxpr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hesso_jax as hj
from hesso_jax.groups import GroupFamily, Groups, Member
from hesso_jax.jaxpr.capture import trace
from hesso_jax.models import CNN, MLP, TinyTransformer
from hesso_jax.snows import (
    GroupMask,
    layer_objective,
    masked_hvp,
    newton_solve,
    nm_mask,
    parse_nm,
    unstructured_mask,
)
from hesso_jax.train import make_eval


def _nm_counts(w: np.ndarray, axes: tuple[int, ...], m: int) -> np.ndarray:
    """Nonzeros in every run of m along the row-major flattening of ``axes``."""
    moved = np.moveaxis(w, axes, tuple(range(len(axes))))
    red = int(np.prod([w.shape[a] for a in axes]))
    return (moved.reshape(red // m, m, -1) != 0).sum(axis=1)


def _dense_fn(params, x):
    return x @ params["w"]


def _two_layer(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


# ------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("pattern,shape,axes", [
    ("2:4", (16, 6), (0,)),             # Dense (in, out): axis 0
    ("1:8", (3, 3, 16, 5), (2,)),       # conv HWIO: input channels
    ("1:4", (2, 8, 12), (0, 1)),        # attention out (heads, head_dim, d): both contracted
])
def test_nm_mask_exact_counts_and_jit(pattern, shape, axes):
    n, m = parse_nm(pattern)
    scores = jax.random.normal(jax.random.key(0), shape)
    mk = np.asarray(nm_mask(scores, axes, n, m))
    assert (_nm_counts(mk.astype(float), axes, m) == n).all()
    jitted = jax.jit(lambda s: nm_mask(s, axes, n, m))
    np.testing.assert_array_equal(np.asarray(jitted(scores)), mk)
    # the kept ones are the largest of their run
    red = int(np.prod([shape[a] for a in axes]))
    runs = np.moveaxis(np.asarray(scores), axes, tuple(range(len(axes)))).reshape(
        red // m, m, -1)
    keep = np.moveaxis(mk, axes, tuple(range(len(axes)))).reshape(runs.shape)
    assert (np.where(keep, runs, np.inf).min(1) >= np.where(keep, -np.inf, runs).max(1)).all()


def test_unstructured_mask_exact_and_ties():
    scores = jnp.ones((10, 7))                      # all ties: still exact
    for s in (0.3, 0.7, 0.9):
        mk = np.asarray(jax.jit(lambda x, s=s: unstructured_mask(x, s))(scores))
        assert (~mk).sum() == round(s * 70)


@pytest.mark.parametrize("bad", ["5:4", "4:4", "0:4", "2-4", "a:b"])
def test_bad_patterns_raise(bad):
    with pytest.raises(ValueError, match="N:M"):
        parse_nm(bad)


def test_bad_arguments_raise():
    model = MLP(64, (12,), 10, rngs=nnx.Rngs(0))
    x = jnp.ones((8, 8, 8, 1))
    with pytest.raises(ValueError, match="layers/0/kernel"):
        hj.snows(model, x, sparsity="1:3")           # 3 does not divide 64
    for s in (1.0, 1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            hj.snows(model, x, sparsity=s)
    with pytest.raises(ValueError, match="5:4"):
        hj.snows(model, x, sparsity="5:4")
    with pytest.raises(ValueError, match="exactly one"):
        hj.snows(model, x)
    with pytest.raises(TypeError, match="K"):
        hj.snows(model, x, sparsity="2:4", K=1.5)


# ------------------------------------------------------------------------------ solver
@pytest.mark.parametrize("loop", ["host", "jit"])
def test_single_linear_layer_matches_restricted_least_squares(loop):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (96, 12))
    w = jax.random.normal(kw, (12, 5))
    pruned, rep = hj.snows(_dense_fn, {"w": w}, x, sparsity="2:4", K=0, newton_steps=3,
                           cg_max_iters=100, cg_tol=1e-7, damping=0.0, batch_size=32,
                           loop=loop)
    mk = np.asarray(nm_mask(jnp.abs(w), (0,), 2, 4))
    xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
    expect = np.zeros_like(wn)
    for j in range(wn.shape[1]):
        s = mk[:, j]
        expect[s, j] = np.linalg.lstsq(xn[:, s], xn @ wn[:, j], rcond=None)[0]
    np.testing.assert_allclose(np.asarray(pruned["w"]), expect, rtol=2e-3, atol=2e-3)
    assert (np.asarray(pruned["w"])[~mk] == 0).all()
    (layer,) = rep.layers
    best = np.mean((xn @ expect - xn @ wn) ** 2)
    assert layer.objective_after == pytest.approx(best, rel=1e-3)
    assert layer.objective_after < layer.objective_before
    assert layer.cg_iterations >= 1 and layer.newton_steps >= 1


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_hvp_matches_dense_hessian(gauss_newton):
    ks = jax.random.split(jax.random.key(2), 4)
    params = {"w1": jax.random.normal(ks[0], (4, 3)), "b1": jnp.zeros(3),
              "w2": jax.random.normal(ks[1], (3, 2))}
    x = jax.random.normal(ks[2], (10, 4))
    prog = trace(_two_layer, params, x)
    op = prog.ops[0]
    assert prog.paths[op.leaf] == ("w1",)
    seg = prog.segment(op.leaf, [o.out_key for o in prog.downstream_ops(op.leaf)])
    assert len(seg.targets) == 2
    leaves = jax.tree.leaves(params)
    bnd = [v[None] for v in prog.capture_all(leaves, [x], seg.boundary)]
    w_dense = params["w1"]
    w = w_dense + 0.3 * jax.random.normal(ks[3], w_dense.shape)   # off the optimum
    tgt = [v[None] for v in prog.capture_all(leaves, [x], seg.targets)]
    mask = (jnp.arange(12).reshape(4, 3) % 3 != 0).astype(jnp.float32)
    loss = layer_objective(prog, seg)
    if gauss_newton:
        def resid(wf):
            outs = prog.eval_segment(seg, wf.reshape(4, 3), [b[0] for b in bnd])
            return jnp.concatenate([((o - t[0]) / np.sqrt(o.size)).ravel()
                                    for o, t in zip(outs, tgt, strict=True)])
        J = jax.jacfwd(resid)(w.ravel())
        H = 2 * J.T @ J
    else:
        H = jax.hessian(lambda wf: loss(wf.reshape(4, 3), bnd, tgt))(w.ravel())
    hvp = jax.jit(masked_hvp(prog, seg, gauss_newton=gauss_newton))
    m = mask.ravel()
    for v in jax.random.normal(jax.random.key(3), (3, 12)):
        got = hvp(w, mask, v.reshape(4, 3), bnd, tgt).ravel()
        np.testing.assert_allclose(got, m * (H @ (m * v)), rtol=1e-4, atol=1e-5)
    solve = newton_solve(prog, seg)
    assert hasattr(solve, "lower")                      # a jitted function
    out = solve(w, mask > 0, bnd, tgt, 2, 10, 1e-4, 1e-4)
    assert float(out[2]) <= float(out[1])


# ------------------------------------------------------------------------------ models
def _logit_mse(a, b, x):
    fa, fb = make_eval(a), make_eval(b)
    return float(jnp.mean((fa(nnx.state(a), x) - fb(nnx.state(b), x)) ** 2))


def test_mlp_unstructured_layer_and_global():
    model = MLP(64, (32, 16), 10, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(4), (64, 8, 8, 1))
    before = jax.tree.map(np.asarray, nnx.state(model))
    pruned, rep = hj.snows(model, x, sparsity=0.7, K=1, newton_steps=2, cg_max_iters=10)
    kernels = [("layers", 0, "kernel"), ("layers", 1, "kernel"), ("head", "kernel")]
    assert [lr.path for lr in rep.layers] == kernels
    flat = dict(zip(hj.tree_paths(nnx.state(pruned)), jax.tree.leaves(nnx.state(pruned)),
                    strict=True))
    for lr in rep.layers:
        assert lr.objective_after <= lr.objective_before
        k = np.asarray(flat[lr.path])
        assert (k == 0).sum() == round(0.7 * k.size)            # exactly the requested count
    masked, _ = hj.snows(model, x, sparsity=0.7, K=1, newton_steps=0)
    assert _logit_mse(pruned, model, x) < _logit_mse(masked, model, x)
    # the input model is untouched
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, nnx.state(model)))
    g, grep = hj.snows(model, x, sparsity=0.8, scope="global", max_layer_sparsity=0.95,
                       K=1, newton_steps=1, cg_max_iters=5)
    gflat = dict(zip(hj.tree_paths(nnx.state(g)), jax.tree.leaves(nnx.state(g)), strict=True))
    zeros = sum(int((np.asarray(gflat[k]) == 0).sum()) for k in kernels)
    total = sum(np.size(gflat[k]) for k in kernels)
    assert zeros == round(0.8 * total)                          # exact global count
    assert max(lr.sparsity for lr in grep.layers) <= 0.95 + 1e-6


def test_cnn_nm_and_group_mask_bn_eval():
    model = CNN(8, 16, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(5), (32, 8, 8, 1))
    # give BatchNorm non-trivial running statistics
    for name in ("stem", "block_a", "block_b", "down"):
        bn = getattr(model, name).bn
        bn.mean[...] = 0.1 * jnp.arange(bn.mean.shape[0], dtype=jnp.float32)
        bn.var[...] = 1.0 + 0.05 * jnp.arange(bn.var.shape[0], dtype=jnp.float32)
    pruned, rep = hj.snows(model, x, sparsity="2:4", K=2, newton_steps=1, cg_max_iters=8,
                           batch_size=16, layers=[("block_a", "conv", "kernel"),
                                                  ("down", "conv", "kernel")])
    assert rep.layers[0].ops[:1] == (1,) and len(rep.layers[0].ops) == 3
    for lr in rep.layers:
        assert lr.objective_after <= lr.objective_before
    k = np.asarray(pruned.block_a.conv.kernel[...])
    assert (_nm_counts(k, (2,), 4) <= 2).all()
    # group mask: remove half of block_a's channels (HESSO-style structured pruning)
    groups = model.groups()
    keep = np.ones(groups.num_groups, bool)
    keep[8:12] = False                              # block_a family: groups 8..15
    gm = GroupMask(groups, keep)
    spruned, srep = hj.snows(model, x, sparsity=gm, K=1, newton_steps=2, cg_max_iters=10)
    assert [lr.path for lr in srep.layers] == [("block_a", "conv", "kernel"),
                                               ("block_b", "conv", "kernel")]
    assert not np.asarray(spruned.block_a.conv.kernel[...])[..., :4].any()
    assert not np.asarray(spruned.block_a.bn.bias[...])[:4].any()
    assert not np.asarray(spruned.block_b.conv.kernel[...])[:, :, :4].any()
    assert groups.zero_groups(nnx.state(spruned, nnx.Param))[8:12].all()
    for lr in srep.layers:
        assert lr.objective_after <= lr.objective_before
    plain, _ = hj.snows(model, x, sparsity=gm, K=1, newton_steps=0)
    assert _logit_mse(spruned, model, x) < _logit_mse(plain, model, x)
    assert GroupMask.from_zeros(groups, nnx.state(spruned, nnx.Param)).keep[8:12].sum() == 0


def test_transformer_nm_gauss_newton_wanda_and_user_mask():
    model = TinyTransformer(d_model=16, num_heads=2, mlp_dim=16, depth=1,
                            rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(6), (16, 8, 8))
    a = ("blocks", 0, "attn")
    pruned, rep = hj.snows(model, x, sparsity="2:4", K=2, criterion="wanda",
                           gauss_newton=True, newton_steps=1, cg_max_iters=5,
                           layers=[(*a, "out"), (*a, "query")])
    paths = [lr.path for lr in rep.layers]
    assert paths == [(*a, "query"), (*a, "out")]          # forward order
    for lr in rep.layers:
        assert lr.objective_after <= lr.objective_before
    q = rep.layers[paths.index(("blocks", 0, "attn", "query"))]
    out_idx = paths.index(("blocks", 0, "attn", "out"))
    assert q.ops[1] == rep.layers[out_idx].ops[0]           # key/value skipped
    out = np.asarray(pruned.blocks[0].attn.out[...])
    assert (_nm_counts(out, (0, 1), 4) <= 2).all()
    # user mask on a single kernel: refined, other kernels untouched
    w = model.blocks[0].fc1.kernel[...]
    mk = np.asarray(jnp.abs(w) > jnp.median(jnp.abs(w)))
    upr, urep = hj.snows(model, x, mask={("blocks", 0, "fc1", "kernel"): mk}, K=1,
                         newton_steps=2, cg_max_iters=10)
    assert [lr.path for lr in urep.layers] == [("blocks", 0, "fc1", "kernel")]
    assert not np.asarray(upr.blocks[0].fc1.kernel[...])[~mk].any()
    np.testing.assert_array_equal(np.asarray(upr.blocks[0].fc2.kernel[...]),
                                  np.asarray(model.blocks[0].fc2.kernel[...]))
    assert urep.layers[0].objective_after < urep.layers[0].objective_before


def test_wanda_scores_match_hand_computed():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (40, 8)) * jnp.arange(1, 9)
    w = jax.random.normal(kw, (8, 3))
    pruned, _ = hj.snows(_dense_fn, {"w": w}, x, sparsity=0.5, criterion="wanda",
                         newton_steps=0)
    score = np.abs(np.asarray(w)) * np.linalg.norm(np.asarray(x), axis=0)[:, None]
    expect = np.asarray(unstructured_mask(jnp.asarray(score), 0.5))
    np.testing.assert_array_equal(np.asarray(pruned["w"]) != 0, expect)


def test_group_mask_validation():
    groups = Groups.from_families([GroupFamily(3, (Member(("w",), 1),))])
    with pytest.raises(ValueError, match="bool"):
        GroupMask(groups, np.ones(4, bool))


def test_structured_snows_after_hesso():
    import optax

    from hesso_jax.data import load_digits_split
    from hesso_jax.train import train_classifier

    data = load_digits_split(0)
    model = MLP(64, (16,), 10, rngs=nnx.Rngs(0))
    groups = model.groups()
    tx = optax.chain(optax.adam(1e-2), hj.hesso(groups, 8, 2, 5, warmup_steps=5))
    _, opt_state, _ = train_classifier(model, tx, data, steps=20, progress=False)
    gm = GroupMask.from_hesso(groups, opt_state)
    assert (~gm.keep).sum() == 8
    np.testing.assert_array_equal(gm.keep, ~groups.zero_groups(nnx.state(model, nnx.Param)))
    x = jnp.asarray(data.x_train[:64])
    pruned, rep = hj.snows(model, x, sparsity=gm, K=1, newton_steps=2, cg_max_iters=10)
    # the consumer (head) is refined on its remaining input rows; removed rows stay zero
    assert [lr.path for lr in rep.layers] == [("layers", 0, "kernel"), ("head", "kernel")]
    assert not np.asarray(pruned.head.kernel[...])[~gm.keep].any()
    assert all(lr.objective_after <= lr.objective_before for lr in rep.layers)
