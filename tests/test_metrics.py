"""Metrics against brute-force definitions."""

import numpy as np
import pytest

from mian_jax import metrics


def brute_force_auc(labels, scores):
  pos = scores[labels == 1]
  neg = scores[labels == 0]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 300)
  scores = rng.integers(0, 10, 300) / 10.0  # many ties
  assert metrics.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_extremes_and_single_class():
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
  assert np.isnan(metrics.auc([1, 1], [0.1, 0.2]))


def test_gauc_is_impression_weighted_and_skips_single_class_users():
  # user 0: 4 impressions, AUC 1.0; user 1: 2 impressions, AUC 0.0; user 2: only clicks.
  groups = [0, 0, 0, 0, 1, 1, 2, 2]
  labels = [0, 0, 1, 1, 1, 0, 1, 1]
  scores = [.1, .2, .3, .4, .1, .9, .5, .5]
  value, users = metrics.gauc(labels, scores, groups)
  assert users == 2
  assert value == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)


def test_gauc_equals_brute_force_on_random_groups():
  rng = np.random.default_rng(1)
  groups = rng.integers(0, 20, 500)
  labels = rng.integers(0, 2, 500)
  scores = rng.random(500)
  total = weight = 0.0
  for g in np.unique(groups):
    m = groups == g
    if 0 < labels[m].sum() < m.sum():
      total += m.sum() * brute_force_auc(labels[m], scores[m])
      weight += m.sum()
  assert metrics.gauc(labels, scores, groups)[0] == pytest.approx(total / weight)


def test_logloss_and_compute_metrics():
  labels = np.array([1, 0, 1, 0])
  probs = np.array([0.9, 0.1, 0.6, 0.4])
  expected = -np.mean(np.log([0.9, 0.9, 0.6, 0.6]))
  assert metrics.logloss(labels, probs) == pytest.approx(expected)
  result = metrics.compute_metrics(labels, probs, [0, 0, 1, 1], click_prob=probs)
  assert result["auc"] == 1.0 and result["oracle_auc"] == 1.0
  assert result["num_examples"] == 4
  assert metrics.logloss([1], [0.0]) == pytest.approx(-np.log(metrics.LOGLOSS_EPS))
