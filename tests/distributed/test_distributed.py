"""Data-parallel curvlab on 2 gloo ranks (spawned CPU processes) against one process on the whole data.

One module-scoped spawn runs every scenario of :mod:`_scenarios` on both ranks (a few
seconds); each test compares one result with the single-process one to 1e-10 in float64.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import curvlab as cl
from curvlab import distributed as cd

sys.path.insert(0, os.path.dirname(__file__))
import _scenarios  # noqa: E402

_HAVE_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not _HAVE_GLOO, reason="torch.distributed with the gloo backend is unavailable")

#: results that must equal the single-process run on the whole data
EXACT = [
    "hvp", "hmm", "h_value", "h_grad", "hvp_forward", "hvp_onebatch",
    "ggn", "ggn_mm", "ggn_value", "ggn_grad", "fisher", "ggn_sum",
    "eigsh", "eigsh_noseed", "trace", "trace_hpp", "diag", "density",
    "cg", "minres", "jac_residuals", "jvp", "vjp",
    "prob_value", "prob_grad", "prob_value_only", "prob_hvp", "closed_value", "closed_grad",
    "egn_x", "egn_value", "sven_x", "sven_rand_x", "gd_x", "newtoncg_x", "newtoncg_value",
    "egn_lsq_x", "gn_lsq_x", "mfac_x", "optim_egn_x", "optim_sven_x", "optim_mfac_x", "optim_sfn_x",
    "bl_f", "bl_g", "bl_f_grads", "bl_g_grad_y", "bl_second_g", "bl_hvp_op", "bl_onebatch_grads", "bl_closed_g",
    "bl_diff_grads", "bl_diff_hvp", "itd_x", "aid_x", "aid_y", "ift_x",
    "f2sa_x", "f2sa_y", "f2sa_mom_x", "borep_x", "borep_y",
    "empty_hvp", "empty_ggn", "empty_jvp", "empty_value", "empty_grad", "empty_gd_x", "empty_egn_x", "empty_gn_x",
    "empty_all_error",
]  # fmt: skip
#: results drawn from unseeded probes: a single process draws other ones, but the ranks must agree
RANKS_ONLY = ["trace_noseed", "lanczos_alpha"]


@pytest.fixture(scope="module")
def ranks():
    try:
        return _scenarios.spawn_all(2)
    except (OSError, PermissionError) as e:  # no multiprocessing on this machine
        pytest.skip(f"cannot spawn processes here: {e}")


@pytest.fixture(scope="module")
def reference():
    assert not cd.is_distributed()
    return _scenarios.run_all()


@needs_gloo
def test_ranks_agree_bitwise(ranks):
    assert set(ranks[0]) == set(EXACT) | set(RANKS_ONLY)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@needs_gloo
@pytest.mark.parametrize("key", EXACT)
def test_matches_single_process(ranks, reference, key):
    got, want = ranks[0][key], reference[key]
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- helpers without a process group
def test_helpers_are_noops_without_a_group():
    t = torch.arange(3.0)
    assert not cd.is_distributed() and cd.rank() == 0 and cd.world_size() == 1 and cd.is_main_process()
    assert cd.all_reduce_sum(t) is t and cd.all_reduce_mean(t) is t and cd.all_gather_cat(t) is t
    assert cd.broadcast(t) is t and cd.all_reduce_sum(3) == 3
    assert cd.shared_seed() is None and cd.shared_seed(5) == 5
    g = torch.Generator()
    assert cd.synced_generator(None, "cpu") is None and cd.synced_generator(g, "cpu") is g
    with cd.local():
        assert not cd.is_distributed()
    H = cl.linops.hessian(lambda x: (x**3).sum(), torch.ones(3))
    assert not H.distributed and not H.damped(1.0).distributed
    assert not cl.Minimize(lambda x: (x**2).sum(), torch.ones(2)).distributed
    import bilevel as bl

    q = bl.BilevelProblem(
        lambda x, y, b: (y**2).sum(), lambda x, y, b: ((y - x) ** 2).sum(), torch.ones(2), torch.ones(2)
    )
    assert not q.distributed
    w = torch.ones(2, requires_grad=True)
    assert not cl.optim.MFAC([w]).distributed and not cl.optim.EGN([w], distributed=True).distributed
    with pytest.raises(TypeError, match="distributed"):
        cl.optim.Sven([w], distributed="yes")  # type: ignore[arg-type]


def test_shard_tensors_lists_and_datasets():
    X, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    parts = [cd.shard((X, y), rank=r, world_size=2) for r in range(2)]
    assert [p[0].shape[0] for p in parts] == [3, 2]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), X)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), y)
    d = cd.shard({"x": X, "y": y}, rank=1, world_size=2)
    assert set(d) == {"x", "y"} and d["y"].tolist() == [3, 4]
    assert cd.shard([1, 2, 3, 4, 5], rank=1, world_size=2) == [2, 4]
    ds = torch.utils.data.TensorDataset(X, y)
    sub = cd.shard(ds, rank=1, world_size=2)
    assert len(sub) == 2 and sub[0][1].item() == 3
    assert cd.shard(X) is not None and torch.equal(cd.shard(X), X)  # one process: everything
    with pytest.raises(ValueError, match="rank"):
        cd.shard(X, rank=2, world_size=2)
    with pytest.raises(ValueError, match="leading dimension"):
        cd.shard((X, torch.arange(4)), rank=0, world_size=2)
    with pytest.raises(TypeError, match="shard expects"):
        cd.shard(3, rank=0, world_size=2)
