"""Linear SVMs on a few per-image statistics (e.g. an anomaly map's mean and max): the fit at the
hard-margin end of a huge C, and out-of-fold scores of a k-fold protocol."""

import numpy as np


def linear_svm(x, y, nonnegative: bool = False):
  """A linear SVM's (w, b) for points x (N, d) of classes y in {0, 1}, at the hard-margin end of
  the triplet paper's C = 1e8 (Sec. III-E): among the separators with the least total hinge loss (each class's
  weighted by N / (2 * its count), so the number of erased copies per image does not tilt it),
  the one of widest margin. Two exact steps instead of libsvm, which stops at
  its iteration limit with a wrong sign when a huge C meets classes that overlap: a linear
  programme for the least hinge loss H, then a quadratic programme for the smallest ||w|| whose
  hinge loss stays at H. nonnegative: every weight >= 0 (a score that never falls as a
  statistic rises)."""
  from scipy import optimize
  mean, std = x.mean(axis=0), max(float(x.std()), 1e-12)  # one shift and one scale for all features:
  z = (x - mean) / std                                       # the widest margin is invariant to them
  n, d = z.shape
  sign = np.where(y == 1, 1.0, -1.0)
  weight = np.where(y == 1, n / (2.0 * max(1, (y == 1).sum())), n / (2.0 * max(1, (y == 0).sum())))
  # Variables [w (d), b, xi (n)]; constraints sign_i (w . z_i + b) + xi_i >= 1, xi >= 0.
  margin = np.hstack([sign[:, None] * z, sign[:, None], np.eye(n)])
  bounds = [(0, None) if nonnegative else (None, None)] * d + [(None, None)] + [(0, None)] * n
  lp = optimize.linprog(np.concatenate([np.zeros(d + 1), weight]), A_ub=-margin, b_ub=-np.ones(n), bounds=bounds,
                        method="highs")
  if lp.status != 0:
    raise RuntimeError(f"the SVM's linear programme failed: {lp.message}")
  hinge = lp.fun
  tolerance = 1e-7 * max(1.0, hinge)
  constraints = [{"type": "ineq", "fun": lambda v: margin @ v - 1.0, "jac": lambda v: margin},
                 {"type": "ineq", "fun": lambda v: hinge + tolerance - weight @ v[d + 1:],
                  "jac": lambda v: np.concatenate([np.zeros(d + 1), -weight])}]
  qp = optimize.minimize(lambda v: 0.5 * v[:d] @ v[:d], lp.x,
                         jac=lambda v: np.concatenate([v[:d], np.zeros(n + 1)]), bounds=bounds,
                         constraints=constraints, method="SLSQP", options={"maxiter": 500})
  v = qp.x if qp.success else lp.x  # the least-hinge separator is the answer up to the margin's tie-break
  w = v[:d] / std
  return w, float(v[d] - np.sum(v[:d] * mean / std))


def out_of_fold_scores(x, y, folds: int, seed: int):
  """Each point's linear-SVM decision value from the model fitted on the other folds only
  (stratified: each class's points shuffled with `seed` and dealt round-robin into `folds`).
  None when a class has fewer than two points; fewer folds when a class has fewer than `folds`."""
  x, y = np.asarray(x, np.float64), np.asarray(y)
  smallest = min(int((y == 0).sum()), int((y == 1).sum()))
  if smallest < 2:
    return None
  folds = min(folds, smallest)
  rng = np.random.default_rng(seed)
  fold = np.empty(len(y), int)
  for label in (0, 1):
    members = rng.permutation(np.flatnonzero(y == label))
    fold[members] = np.arange(len(members)) % folds
  scores = np.empty(len(y))
  for f in range(folds):
    held = fold == f
    w, b = linear_svm(x[~held], y[~held])
    scores[held] = x[held] @ w + b
  return scores
