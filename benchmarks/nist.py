"""NIST StRD nonlinear regression: curvlab's GaussNewton beside scipy's ``least_squares(method="lm")`` (MINPACK).

The 27 problems of the NIST Statistical Reference Datasets for nonlinear least squares
(https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml), each from its two official starts:
54 cases. A case is *solved* when every parameter agrees with NIST's certified value to
6 significant digits (log relative error LRE = -log10(|b - b*|/|b*|) >= 6, the usual StRD
score). Two tables: both solvers with their default tolerances (MINPACK's 1.49e-8 for curvlab,
scipy's 1e-8; an extra untimed column gives scipy's digits with 1.49e-8 too), and both with
ftol = xtol = gtol = 1e-15; the same budget of 10 000 residual
evaluations. scipy gets the torch residual function and, as its Jacobian, the very routine
GaussNewton calls inside (``LeastSquares.jacobian(x).to_dense()``), so the time ratio measures
the solvers, not two ways of differentiating; float64, one process, one run,
the two interleaved case by case, best of ``--repeat``.

The data files are not part of curvlab. They ship in the source distribution of the PyPI
package ``lmfit`` (folder ``NIST_STRD``); this script reads them from ``--data DIR`` or
``$CURVLAB_NIST_STRD``, or else fetches that sdist once with ``pip download`` into
``~/.cache/curvlab/nist_strd`` and reads the ``.dat`` files from it. The model functions
below are written from the model lines of NIST's files; ``--check`` verifies each against
NIST's certified residual sum of squares at the certified parameters.

A second table: iteration counts of GaussNewton and MINPACK on the Moré–Garbow–Hillstrom
problems of ``tests/solvers/mgh.py`` (Brown–Dennis among them), both at default tolerances.

Run: ``python benchmarks/nist.py [--data DIR] [--repeat 3] [--check]`` (2–5 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LMFIT_SDIST = "lmfit==1.3.4"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "curvlab", "nist_strd")

PI = math.pi


def _models() -> dict[str, Any]:
    """NIST model functions ``f(b, x) -> y`` (``x``: ``(n,)`` or ``(n, 2)`` for Nelson), from the files' model lines."""
    exp, atan = torch.exp, torch.atan

    def rational(num: int):  # (b1 + b2 x + ... ) / (1 + b_{num+1} x + ...)
        def f(b, x):
            top = sum(b[i] * x**i for i in range(num))
            bot = 1 + sum(b[num + i] * x ** (i + 1) for i in range(len(b) - num))
            return top / bot

        return f

    three_exp = lambda b, x: b[0] * exp(-b[1] * x) + b[2] * exp(-b[3] * x) + b[4] * exp(-b[5] * x)  # noqa: E731
    gauss = lambda b, x: (  # noqa: E731
        b[0] * exp(-b[1] * x) + b[2] * exp(-((x - b[3]) ** 2) / b[4] ** 2) + b[5] * exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )
    chwirut = lambda b, x: exp(-b[0] * x) / (b[1] + b[2] * x)  # noqa: E731
    w = 2 * PI / 12
    return {
        "Misra1a": lambda b, x: b[0] * (1 - exp(-b[1] * x)),
        "Chwirut2": chwirut,
        "Chwirut1": chwirut,
        "Lanczos3": three_exp,
        "Gauss1": gauss,
        "Gauss2": gauss,
        "DanWood": lambda b, x: b[0] * x ** b[1],
        "Misra1b": lambda b, x: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
        "Kirby2": rational(3),
        "Hahn1": rational(4),
        "Nelson": lambda b, x: b[0] - b[1] * x[:, 0] * exp(-b[2] * x[:, 1]),
        "MGH17": lambda b, x: b[0] + b[1] * exp(-x * b[3]) + b[2] * exp(-x * b[4]),
        "Lanczos1": three_exp,
        "Lanczos2": three_exp,
        "Gauss3": gauss,
        "Misra1c": lambda b, x: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
        "Misra1d": lambda b, x: b[0] * b[1] * x / (1 + b[1] * x),
        "Roszman1": lambda b, x: b[0] - b[1] * x - atan(b[2] / (x - b[3])) / PI,
        "ENSO": lambda b, x: (
            b[0]
            + b[1] * torch.cos(w * x)
            + b[2] * torch.sin(w * x)
            + b[4] * torch.cos(2 * PI * x / b[3])
            + b[5] * torch.sin(2 * PI * x / b[3])
            + b[7] * torch.cos(2 * PI * x / b[6])
            + b[8] * torch.sin(2 * PI * x / b[6])
        ),
        "MGH09": lambda b, x: b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3]),
        "Thurber": rational(4),
        "BoxBOD": lambda b, x: b[0] * (1 - exp(-b[1] * x)),
        "Rat42": lambda b, x: b[0] / (1 + exp(b[1] - b[2] * x)),
        "MGH10": lambda b, x: b[0] * exp(b[1] / (x + b[2])),
        "Eckerle4": lambda b, x: (b[0] / b[1]) * exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
        "Rat43": lambda b, x: b[0] / (1 + exp(b[1] - b[2] * x)) ** (1 / b[3]),
        "Bennett5": lambda b, x: b[0] * (b[1] + x) ** (-1 / b[2]),
    }


#: NIST's difficulty levels (lower, average, higher), for the table
LEVEL = {
    **dict.fromkeys(["Misra1a", "Chwirut2", "Chwirut1", "Lanczos3", "Gauss1", "Gauss2", "DanWood", "Misra1b"], "low"),
    **dict.fromkeys(["Kirby2", "Hahn1", "Nelson", "MGH17", "Lanczos1", "Lanczos2", "Gauss3"], "average"),
    **dict.fromkeys(["Misra1c", "Misra1d", "Roszman1", "ENSO"], "average"),
    **dict.fromkeys(["MGH09", "Thurber", "BoxBOD", "Rat42", "MGH10", "Eckerle4", "Rat43", "Bennett5"], "high"),
}


@dataclass
class StRD:
    """One NIST StRD problem: data, the two starts, the certified parameters and residual sum of squares."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    starts: tuple[list[float], list[float]]
    certified: list[float]
    rss: float
    model: Any

    def residuals(self, b: torch.Tensor) -> torch.Tensor:
        """Residuals ``f(b, x) - y`` (Nelson: ``f - log y``, its model being for ``log y``)."""
        y = torch.log(self.y) if self.name == "Nelson" else self.y
        return self.model(b, self.x) - y


def _fetch(dest: str) -> str:
    """Fetch lmfit's sdist with pip and extract its ``NIST_STRD/*.dat`` into ``dest``."""
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                LMFIT_SDIST,
                "--no-deps",
                "--no-binary",
                ":all:",
                "-q",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = glob.glob(os.path.join(tmp, "lmfit-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if re.search(r"/NIST_STRD/[A-Za-z0-9]+\.dat$", m.name):
                    f = tar.extractfile(m)
                    assert f is not None
                    with open(os.path.join(dest, os.path.basename(m.name)), "wb") as out:
                        out.write(f.read())
    return dest


def data_dir(path: str | None = None, fetch: bool = True) -> str | None:
    """The folder with the StRD ``.dat`` files: ``path``, ``$CURVLAB_NIST_STRD``, the cache, or fetched into it."""
    for d in (path, os.environ.get("CURVLAB_NIST_STRD"), CACHE):
        if d and len(glob.glob(os.path.join(d, "*.dat"))) >= 27:
            return d
    if not fetch:
        return None
    return _fetch(CACHE)


def _num(s: str) -> float:
    return float(s.replace("E", "e"))


def parse(path: str, dtype: torch.dtype = torch.float64) -> StRD:
    """Read one NIST StRD ``.dat`` file."""
    name = os.path.splitext(os.path.basename(path))[0]
    lines = open(path).read().splitlines()
    starts1, starts2, cert = [], [], []
    rss = math.nan
    data_at = None
    for i, line in enumerate(lines):
        m = re.match(r"\s*b\d+\s*=\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", line)
        if m and data_at is None:
            starts1.append(_num(m.group(1)))
            starts2.append(_num(m.group(2)))
            cert.append(_num(m.group(3)))
        if line.strip().startswith("Residual Sum of Squares:"):
            rss = _num(line.split(":")[1].split()[0])
        if re.match(r"\s*Data:\s+y\s", line):
            data_at = i + 1
    assert data_at is not None and cert, path
    rows = [[_num(v) for v in ln.split()] for ln in lines[data_at:] if ln.strip()]
    arr = torch.tensor(rows, dtype=dtype)
    y, x = arr[:, 0], arr[:, 1:]
    x = x[:, 0] if x.shape[1] == 1 else x
    return StRD(name, x, y, (starts1, starts2), cert, rss, _models()[name])


def load(path: str | None = None, fetch: bool = True) -> list[StRD]:
    """All 27 problems, in NIST's order of difficulty (``[]`` if the data cannot be found and ``fetch`` is off)."""
    d = data_dir(path, fetch)
    if d is None:
        return []
    order = list(LEVEL)
    probs = [parse(os.path.join(d, f"{n}.dat")) for n in order]
    return probs


def lre(b: np.ndarray, cert: list[float]) -> float:
    """Smallest log relative error over the parameters (correct significant digits; 15 when exact)."""
    c = np.asarray(cert)
    err = np.abs(np.asarray(b) - c) / np.abs(c)
    with np.errstate(divide="ignore"):
        digits = -np.log10(err)
    return float(np.minimum(np.nan_to_num(digits, nan=0.0, posinf=15.0), 15.0).min())


TIGHT = 1e-15
#: GaussNewton's default ftol = xtol = gtol (MINPACK's recommended sqrt(eps); scipy's least_squares uses 1e-8)
DEFAULT = math.sqrt(np.finfo(np.float64).eps)
MAX_EVALS = 10000


def run_curvlab(P: StRD, x0: list[float], tol: float | None = None) -> tuple[np.ndarray, int, str]:
    """GaussNewton from ``x0`` (``tol``: ftol = xtol = gtol, ``None``: the defaults): ``(b, evaluations, status)``."""
    import curvlab as cl

    kw = {} if tol is None else {"ftol": tol, "xtol": tol, "gtol": tol}
    prob = cl.LeastSquares(P.residuals, torch.tensor(x0, dtype=torch.float64))
    r = cl.solvers.GaussNewton(**kw).solve(prob, max_iter=MAX_EVALS - 1)
    return r.flat.numpy(), r.n_iter + 1, str(r.status)


def same_jacobian(P: StRD, x0: list[float]) -> Any:
    """The Jacobian exactly as GaussNewton takes it (the problem's Jacobian operator, materialised)."""
    import curvlab as cl

    prob = cl.LeastSquares(P.residuals, torch.tensor(x0, dtype=torch.float64))
    return lambda b: prob.jacobian(b, cl.ALL).to_dense()


def run_scipy(P: StRD, x0: list[float], tol: float | None = None) -> tuple[np.ndarray, int, str]:
    """scipy ``least_squares(method="lm")``: the same torch residuals, GaussNewton's own Jacobian, the same budget."""
    import scipy.optimize

    jac = same_jacobian(P, x0)
    kw = {} if tol is None else {"ftol": tol, "xtol": tol, "gtol": tol}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = scipy.optimize.least_squares(
            lambda b: P.residuals(torch.from_numpy(b)).numpy(),
            np.asarray(x0, dtype=np.float64),
            jac=lambda b: jac(torch.from_numpy(b)).numpy(),
            method="lm",
            max_nfev=MAX_EVALS,
            **kw,
        )
    return r.x, int(r.nfev), f"status {r.status}"


def check_models(probs: list[StRD]) -> None:
    """Each model at the certified parameters gives NIST's certified residual sum of squares (to 1e-6 relative)."""
    for P in probs:
        r = P.residuals(torch.tensor(P.certified, dtype=torch.float64))
        rss = float((r**2).sum())
        ok = abs(rss - P.rss) <= 1e-6 * P.rss + 1e-20
        print(f"{P.name:<9} certified RSS {P.rss:.10e}  model {rss:.10e}  {'ok' if ok else 'MISMATCH'}")
        assert ok, P.name


def mgh_table() -> None:
    """Iterations of GaussNewton vs MINPACK function evaluations on the MGH problems, default tolerances."""
    import scipy.optimize

    import curvlab as cl

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.solvers.mgh import PROBLEMS

    print(
        "\nMoré–Garbow–Hillstrom problems, default tolerances: residual evaluations (curvlab: iterations + 1, "
        "the first at x0; MINPACK: nfev)"
    )
    print(f"{'problem':<22} {'curvlab':>8} {'MINPACK':>8} {'curvlab ½‖r‖²':>14} {'MINPACK ½‖r‖²':>14}")
    for P in PROBLEMS:
        x0 = P.start()
        r = cl.solvers.GaussNewton().solve(cl.LeastSquares(P.f, x0), max_iter=20000)
        jac = torch.func.jacfwd(P.f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = scipy.optimize.least_squares(
                lambda b, f=P.f: f(torch.from_numpy(b)).numpy(),
                x0.numpy(),
                jac=lambda b, jac=jac: jac(torch.from_numpy(b)).numpy(),
                method="lm",
                max_nfev=20000,
            )
        ss = 0.5 * float((P.f(r.flat) ** 2).sum())
        print(f"{P.name:<22} {r.n_iter + 1:>8} {ref.nfev:>8} {ss:>14.6e} {ref.cost:>14.6e}")


def table(probs: list[StRD], tol: float | None, repeat: int) -> tuple[int, int, float, float]:
    """One side-by-side run over the 54 cases; prints the table, returns (solved curvlab, solved scipy, times)."""
    label = "default tolerances" if tol is None else f"ftol = xtol = gtol = {tol:g} (both)"
    print(f"\n### {label}; residual evaluations (curvlab: iterations + 1), LRE = correct digits, best of {repeat}")
    same = tol is None  # also scipy at curvlab's default tolerances (1.49e-8), untimed: the same stopping rules
    print(
        f"{'problem':<9} {'lvl':<4} {'st':>2} | {'LRE cl':>6} {'evals':>5} {'ms':>7} | "
        f"{'LRE sp':>6} {'nfev':>5} {'ms':>7}" + (f" | {'sp@1.49e-8':>10}" if same else "")
    )
    solved = {"curvlab": 0, "scipy": 0, "same": 0}
    tot = {"curvlab": 0.0, "scipy": 0.0}
    for P in probs:
        for s, x0 in enumerate(P.starts, 1):
            best = {}
            for _ in range(repeat):  # interleaved, so both see the same load
                for name, fn in (("curvlab", run_curvlab), ("scipy", run_scipy)):
                    t = time.perf_counter()
                    out = fn(P, x0, tol)
                    dt = time.perf_counter() - t
                    if name not in best or dt < best[name][1]:
                        best[name] = (out, dt)
            (bc, nc, _), tc = best["curvlab"]
            (bs, ns, _), ts = best["scipy"]
            lc, ls = lre(bc, P.certified), lre(bs, P.certified)
            solved["curvlab"] += lc >= 6
            solved["scipy"] += ls >= 6
            tot["curvlab"] += tc
            tot["scipy"] += ts
            extra = ""
            if same:
                lsame = lre(run_scipy(P, x0, DEFAULT)[0], P.certified)
                solved["same"] += lsame >= 6
                extra = f" | {lsame:>10.1f}"
            print(
                f"{P.name:<9} {LEVEL[P.name][:4]:<4} {s:>2} | {lc:>6.1f} {nc:>5} {1e3 * tc:>7.1f} | "
                f"{ls:>6.1f} {ns:>5} {1e3 * ts:>7.1f}" + extra
            )
    n = 2 * len(probs)
    print(f"solved to 6 digits: curvlab GaussNewton {solved['curvlab']}/{n}, scipy lm {solved['scipy']}/{n}")
    if same:
        print(f"scipy lm with curvlab's default tolerances (1.49e-8): {solved['same']}/{n}")
    print(
        f"total time: curvlab {tot['curvlab']:.2f} s, scipy {tot['scipy']:.2f} s, "
        f"ratio curvlab/scipy {tot['curvlab'] / tot['scipy']:.2f}"
    )
    return solved["curvlab"], solved["scipy"], tot["curvlab"], tot["scipy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder with the NIST StRD .dat files")
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (the best of them is reported)")
    ap.add_argument("--check", action="store_true", help="verify the models at the certified values first")
    ap.add_argument("--no-mgh", action="store_true", help="skip the MGH evaluation-count table")
    ap.add_argument("--only", choices=["default", "tight"], default=None, help="run one of the two tables")
    args = ap.parse_args()
    torch.set_num_threads(1)
    probs = load(args.data)
    if args.check:
        check_models(probs)
    import platform

    import curvlab

    print(
        f"NIST StRD nonlinear regression, 27 problems x 2 starts; {platform.machine()}, torch {torch.__version__}, "
        f"curvlab {getattr(curvlab, '__version__', '?')}, float64, 1 thread, budget {MAX_EVALS} evaluations"
    )
    if args.only in (None, "default"):
        table(probs, None, args.repeat)
    if args.only in (None, "tight"):
        table(probs, TIGHT, args.repeat)
    if not args.no_mgh:
        mgh_table()


if __name__ == "__main__":
    main()
