"""CTR metrics computed exactly over a whole split: AUC (Mann-Whitney, ties counted one half),
logloss (predictions clipped to [1e-7, 1 - 1e-7]) and gAUC (DIN, eq. 6): the AUC within each
user, weighted by the user's impressions, over users with both a click and a non-click,
    gAUC = sum_u n_u AUC_u / sum_u n_u.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LOGLOSS_EPS = 1e-7


def _as_arrays(labels, scores):
  labels = np.asarray(labels, np.float64).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
  bad = int(np.sum(~np.isfinite(scores)))
  if bad:  # a NaN has no rank: AUC and gAUC would come out silently wrong (even negative)
    raise ValueError(f"{bad} of {scores.size} scores are not finite")
  return labels, scores


def auc(labels, scores) -> float:
  """Exact ROC AUC; NaN when only one class is present."""
  labels, scores = _as_arrays(labels, scores)
  positives = labels > 0.5
  n_pos, n_neg = int(positives.sum()), int((~positives).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = pd.Series(scores).rank(method="average").to_numpy()
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels, probs) -> float:
  labels, probs = _as_arrays(labels, probs)
  probs = np.clip(probs, LOGLOSS_EPS, 1 - LOGLOSS_EPS)
  return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def gauc(labels, scores, groups) -> tuple[float, int]:
  """Impression-weighted user AUC (module docstring). Returns (gAUC, users counted)."""
  labels, scores = _as_arrays(labels, scores)
  frame = pd.DataFrame({"g": np.asarray(groups).ravel(), "s": scores, "y": labels > 0.5})
  frame["r"] = frame.groupby("g")["s"].rank(method="average")
  frame["r_pos"] = frame["r"].where(frame["y"], 0.0)
  per = frame.groupby("g").agg(n=("y", "size"), n_pos=("y", "sum"), r_pos=("r_pos", "sum"))
  per = per[(per.n_pos > 0) & (per.n_pos < per.n)]
  if per.empty:
    return float("nan"), 0
  n_neg = per.n - per.n_pos
  user_auc = (per.r_pos - per.n_pos * (per.n_pos + 1) / 2) / (per.n_pos * n_neg)
  return float((per.n * user_auc).sum() / per.n.sum()), int(len(per))


def compute_metrics(labels, probs, groups, click_prob=None) -> dict[str, float | int]:
  """All split metrics. `click_prob`, when known (synthetic data), adds the oracle's AUC."""
  labels = np.asarray(labels)
  result = {
      "auc": auc(labels, probs),
      "logloss": logloss(labels, probs),
      "num_examples": int(labels.size),
      "positive_rate": float(labels.mean()) if labels.size else float("nan"),
  }
  result["gauc"], result["gauc_users"] = gauc(labels, probs, groups)
  if click_prob is not None:
    result["oracle_auc"] = auc(labels, click_prob)
    result["oracle_logloss"] = logloss(labels, click_prob)
  return result
