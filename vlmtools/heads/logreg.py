"""Full-batch L-BFGS, and multinomial logistic regression with it, in numpy (no torch import).

``lbfgs(fun, x0)`` minimises a smooth function of a flat float64 vector, ``fun(x) -> (value, gradient)``,
as scipy's L-BFGS-B does without bounds: 10 curvature pairs, a strong-Wolfe line search (Nocedal & Wright,
algorithms 7.4, 3.5 and 3.6), a first step of length 1, and a stop when no gradient entry exceeds ``tol``.
heads.loop's "lbfgs" solver drives it with a torch model's loss; ``fit_logreg`` with scikit-learn's
LogisticRegression objective,

    mean over rows of -log softmax(x W^T + b)[y]  +  (l2 / 2n) |W|^2      (l2 = 1/C; b unpenalised),

the `train probe` head, computed with float32 matrix products.
"""

from __future__ import annotations

import math
from typing import Callable

TOL = 1e-4          # stop when max |gradient| <= this (scikit-learn's LogisticRegression tol)
HISTORY = 10        # curvature pairs kept (scipy's L-BFGS-B maxcor, as scikit-learn uses it)


def lbfgs(fun: Callable, x0, *, max_iter: int = 100, tol: float = TOL, history: int = HISTORY,
          on_iteration: Callable | None = None):
    """Minimise ``fun`` from ``x0``: (x, value, iterations, converged). Stops when max |gradient| <= ``tol``,
    after ``max_iter`` iterations, or when a line search finds no decrease (float precision reached).
    ``on_iteration(i, x, value)`` runs after each iteration."""
    import numpy as np

    x = np.asarray(x0, dtype=np.float64).copy()
    f, g = fun(x)
    pairs: list[tuple] = []
    for it in range(1, max_iter + 1):
        if float(np.abs(g).max(initial=0.0)) <= tol:
            return x, f, it - 1, True
        d = _two_loop(g, pairs)
        gtd = float(g @ d)
        if not gtd < 0:  # not a descent direction (lost curvature): restart from steepest descent
            pairs.clear()
            d = -g
            gtd = float(g @ d)
        t0 = 1.0 if pairs else 1.0 / max(float(np.linalg.norm(g)), 1e-300)  # the first step moves by 1
        t, f_new, g_new = _wolfe_search(fun, x, f, g, d, gtd, t0)
        if t == 0.0:
            return x, f, it - 1, float(np.abs(g).max(initial=0.0)) <= tol
        s, y = t * d, g_new - g
        sy = float(s @ y)
        if sy > 1e-10 * float(y @ y):
            pairs.append((s, y, 1.0 / sy))
            if len(pairs) > history:
                pairs.pop(0)
        x, f, g = x + s, f_new, g_new
        if on_iteration is not None:
            on_iteration(it, x, f)
    return x, f, max_iter, float(np.abs(g).max(initial=0.0)) <= tol


def _two_loop(g, pairs):
    """-H g by the L-BFGS two-loop recursion (steepest descent without pairs)."""
    q = -g.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        q -= a * y
        alphas.append(a)
    if pairs:
        s, y, _ = pairs[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        q += (a - rho * float(y @ q)) * s
    return q


def _wolfe_search(fun, x, f0, g0, d, gtd0, t, c1=1e-4, c2=0.9, max_evals=25):
    """A step t along d meeting the strong Wolfe conditions (bracketing by 4x, then a safeguarded cubic
    zoom): (t, f(x + t d), gradient there), or (0, f0, g0) when no decrease is found."""

    def phi(step):
        fv, gv = fun(x + step * d)
        return fv, gv, float(gv @ d)

    t_prev, f_prev, gtd_prev = 0.0, f0, gtd0
    best = (0.0, f0, g0)
    lo = hi = None
    evals = 0
    while evals < max_evals:
        f_t, g_t, gtd_t = phi(t)
        evals += 1
        if f_t < best[1]:
            best = (t, f_t, g_t)
        if f_t > f0 + c1 * t * gtd0 or (evals > 1 and f_t >= f_prev):
            lo, hi = (t_prev, f_prev, gtd_prev), (t, f_t, gtd_t)
            break
        if abs(gtd_t) <= -c2 * gtd0:
            return t, f_t, g_t
        if gtd_t >= 0:
            lo, hi = (t, f_t, gtd_t), (t_prev, f_prev, gtd_prev)
            break
        t_prev, f_prev, gtd_prev = t, f_t, gtd_t
        t = t * 4.0  # Moré-Thuente's extrapolation bound
    if lo is None:
        return best if best[0] > 0 else (0.0, f0, g0)
    while evals < max_evals:  # zoom: lo satisfies the decrease condition, [lo, hi] holds a Wolfe point
        t = _cubic_step(lo, hi)
        f_t, g_t, gtd_t = phi(t)
        evals += 1
        if f_t < best[1]:
            best = (t, f_t, g_t)
        if f_t > f0 + c1 * t * gtd0 or f_t >= lo[1]:
            hi = (t, f_t, gtd_t)
        else:
            if abs(gtd_t) <= -c2 * gtd0:
                return t, f_t, g_t
            if gtd_t * (hi[0] - lo[0]) >= 0:
                hi = lo
            lo = (t, f_t, gtd_t)
        if abs(hi[0] - lo[0]) < 1e-12 * max(1.0, abs(lo[0])):
            break
    return best if best[0] > 0 else (0.0, f0, g0)


def _cubic_step(a, b) -> float:
    """The minimiser of the cubic through (t, f, f') at a and b, kept inside the middle 80 % of [a, b]."""
    (ta, fa, ga), (tb, fb, gb) = a, b
    lo, hi = min(ta, tb), max(ta, tb)
    width = hi - lo
    t = (ta + tb) / 2
    if width > 0:
        d1 = ga + gb - 3 * (fa - fb) / (ta - tb)
        disc = d1 * d1 - ga * gb
        if disc >= 0:
            d2 = math.copysign(math.sqrt(disc), tb - ta)
            denom = gb - ga + 2 * d2
            if denom != 0:
                t = tb - (tb - ta) * (gb + d2 - d1) / denom
    return min(max(t, lo + 0.1 * width), hi - 0.1 * width)


def logreg_objective(x, y, n_classes: int, l2: float = 1.0, chunk: int = 65536) -> Callable:
    """fun(theta) -> (value, gradient) of the objective in the module doc; theta = [W (C x d) row-major, b (C)].
    ``x`` (n, d) float32, ``y`` (n,) class indices."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    n, dim = x.shape
    rows = np.arange(n)

    def fun(theta):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a non-finite result is the caller's
            return _value_and_grad(theta)

    def _value_and_grad(theta):
        w = theta[:n_classes * dim].reshape(n_classes, dim)
        b = theta[n_classes * dim:]
        w32, b32 = w.astype(np.float32), b.astype(np.float32)
        gw = np.zeros((n_classes, dim), dtype=np.float64)
        gb = np.zeros(n_classes, dtype=np.float64)
        total = 0.0
        for start in range(0, n, chunk):
            xs, ys, r = x[start:start + chunk], y[start:start + chunk], rows[:min(chunk, n - start)]
            z = xs @ w32.T + b32
            z -= z.max(axis=1, keepdims=True)
            ez = np.exp(z)
            sums = ez.sum(axis=1)
            total += float(np.log(sums).sum() - z[r, ys].astype(np.float64).sum())
            p = ez / sums[:, None]
            p[r, ys] -= 1.0  # softmax - onehot
            gw += (p.T @ xs).astype(np.float64)
            gb += p.sum(axis=0, dtype=np.float64)
        value = total / n + l2 / (2 * n) * float((w * w).sum())
        grad = np.concatenate([(gw / n + (l2 / n) * w).ravel(), gb / n])
        return value, grad

    return fun


def fit_logreg(x, y, n_classes: int, *, l2: float = 1.0, max_iter: int = 100, tol: float = TOL,
               on_iteration: Callable | None = None):
    """scikit-learn's LogisticRegression(C=1/l2) fit from zero weights: (W (C, d) float32, b (C,) float32,
    iterations, converged). ``on_iteration(i, W, b, value)`` runs after each iteration."""
    import numpy as np

    dim = x.shape[1]
    size = n_classes * dim

    def unpack(theta):
        return theta[:size].reshape(n_classes, dim).astype(np.float32), theta[size:].astype(np.float32)

    hook = None if on_iteration is None else (lambda i, theta, f: on_iteration(i, *unpack(theta), f))
    theta, _, iterations, converged = lbfgs(logreg_objective(x, y, n_classes, l2), np.zeros(size + n_classes),
                                            max_iter=max_iter, tol=tol, on_iteration=hook)
    w, b = unpack(theta)
    return w, b, iterations, converged
