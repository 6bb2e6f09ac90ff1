"""NIST StRD nonlinear regression against the certified values (slow; data: see benchmarks/nist.py)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_nist", os.path.join(_HERE, "..", "..", "benchmarks", "nist.py"))
assert _spec is not None and _spec.loader is not None
nist = importlib.util.module_from_spec(_spec)
sys.modules["_nist"] = nist  # dataclasses look their module up
_spec.loader.exec_module(nist)


def _problems():
    probs = nist.load(fetch=False)
    if not probs:
        try:
            probs = nist.load(fetch=True)
        except Exception as e:  # pragma: no cover - no registry access
            pytest.skip(f"NIST StRD data not available: {e}")
    return probs


@pytest.mark.slow
def test_models_reproduce_the_certified_sums_of_squares():
    nist.check_models(_problems())


@pytest.mark.slow
def test_nist_strd_tight_tolerances_all_54():
    """With ftol = xtol = gtol = 1e-15 (both): 6 correct digits on all 54 cases; MINPACK (scipy lm) 53/54."""
    ours = theirs = 0
    missed = []
    for P in _problems():
        for s, x0 in enumerate(P.starts, 1):
            b, _, status = nist.run_curvlab(P, x0, nist.TIGHT)
            ok = nist.lre(b, P.certified) >= 6
            ours += ok
            if not ok:
                missed.append((P.name, s, status))
            bs, _, _ = nist.run_scipy(P, x0, nist.TIGHT)
            theirs += nist.lre(bs, P.certified) >= 6
    assert ours == 54 and ours >= theirs, (ours, theirs, missed)


@pytest.mark.slow
def test_nist_strd_default_tolerances_follow_minpack():
    """Default tolerances: MINPACK's stopping (evaluation counts as scipy's lm on most cases), every run
    "converged" with at least 3 correct digits (no false convergence: MINPACK's xtol stop on MGH17 from start 1
    and its BoxBOD plateau from start 1 are off by 100 %), and at least as many cases to 6 digits as MINPACK
    with the same tolerances (1.49e-8)."""
    close = ours = theirs = 0
    for P in _problems():
        for x0 in P.starts:
            b, n, status = nist.run_curvlab(P, x0)
            _, ns, _ = nist.run_scipy(P, x0)
            close += abs(n - ns) <= max(2, 0.1 * ns)
            assert status == "converged", (P.name, x0, status)
            lre = nist.lre(b, P.certified)
            assert lre >= 3, (P.name, x0, lre)
            ours += lre >= 6
            bs, _, _ = nist.run_scipy(P, x0, nist.DEFAULT)
            theirs += nist.lre(bs, P.certified) >= 6
    assert close >= 45, close
    assert ours >= theirs, (ours, theirs)
    assert torch.get_default_dtype() == torch.float32  # untouched by the run
