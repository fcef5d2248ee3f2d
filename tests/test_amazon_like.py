"""The Amazon-like benchmark: raw files the real parsers accept, the generative story's
properties, and purchase probabilities checked against an independent recomputation."""

import dataclasses
import datetime
import math
import os

import numpy as np
import pytest

from configs import amazon_like as amazon_like_config
from mian_jax import data as data_lib
from mian_jax import encoding, metrics
from mian_jax.data import amazon, amazon_raw
from mian_jax.data import amazon_like
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError

EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def tiny_generator(**overrides):
  g = amazon_like_config.get_generator("small")
  g.num_users, g.num_items, g.num_categories, g.max_reviews_per_user = 2000, 400, 10, 100
  for key, value in overrides.items():
    g[key] = value
  return g


def data_config(raw_dir, prepared_dir="", protocol="mian", **overrides):
  config = amazon_like_config.get_config(f"protocol={protocol},size=small")
  config.data.generator = tiny_generator(**overrides)
  config.data.raw_dir = str(raw_dir)
  config.data.prepared_dir = str(prepared_dir)
  return config.data


def load_prepared(directory):
  schema = schema_lib.read_schema(directory)
  return {s: {k: np.asarray(v) for k, v in schema_lib.load_split(directory, s, schema).items()}
          for s in schema_lib.SPLITS}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  """(data config, truth arrays, prepared splits) of one tiny benchmark, protocol mian."""
  root = tmp_path_factory.mktemp("amazon_like")
  config = data_config(root / "raw", root / "prepared")
  amazon_like.prepare(config, config.prepared_dir)
  with np.load(amazon_like.raw_paths(config.raw_dir, config.generator.name)["truth"]) as npz:
    truth = dict(npz)
  return config, truth, load_prepared(config.prepared_dir)


# ----------------------------------------------------------------------------- an independent
# recomputation of the choice weights, event by event, from the truth arrays and the config.


def reference_weights(truth, g, e):
  """[I] the weights w_i of every item at review e, written out from the module docstring."""
  user = int(np.searchsorted(truth["event_start"], e, side="right") - 1)
  t = e - int(truth["event_start"][user])
  past = truth["event_item"][e - t:e]  # oldest first
  day = int(truth["event_day"][e])
  month = datetime.date.fromordinal(EPOCH_ORDINAL + day).month - 1
  elapsed = day - int(truth["event_day"][e - t])
  f = 1.0 - math.exp(-elapsed / g.taste_drift_days)
  num_categories = truth["season"].shape[0]
  taste = np.full(num_categories, g.taste_floor / num_categories)
  for k, category in enumerate(truth["favourites"][user]):
    weight = (1 - f) * truth["taste_start"][user, k] + f * truth["taste_end"][user, k]
    taste[category] += (1 - g.taste_floor) * weight
  transition = np.zeros(num_categories)
  if t > 0:
    transition = truth["transition"][truth["item_category"][past[-1]]]
  appeal = np.exp(truth["season"][:, month]) * (taste + g.transition_weight * transition)
  weights = appeal[truth["item_category"]] * truth["item_share"]
  for k in range(min(t, g.complement_window)):
    for item in truth["complements"][past[-1 - k]]:
      weights[item] += g.complement_weight * g.complement_decay ** k / g.num_complement_items
  weights[past] = 0.0
  return weights


def test_recorded_normaliser_matches_recomputation(generated):
  config, truth, _ = generated
  rng = np.random.default_rng(0)
  starts = truth["event_start"]
  events = np.concatenate([starts[:5], starts[:5] + 1, starts[:5] + 4,  # t = 0, 1, 4 (> W)
                           rng.choice(len(truth["event_item"]), 200, replace=False)])
  world = amazon_like.load_world(
      amazon_like.raw_paths(config.raw_dir, config.generator.name)["truth"])
  for e in events:
    w = reference_weights(truth, config.generator, e)
    np.testing.assert_allclose(truth["log_z"][e], np.log(w.sum()), rtol=1e-10, atol=1e-12)
    chosen = truth["event_item"][e]
    assert w[chosen] > 0  # never an item bought before
    others = rng.choice(len(w), 5)
    items = np.concatenate([[chosen], others])
    np.testing.assert_allclose(
        amazon_like.purchase_probability(world, np.full(len(items), e), items),
        w[items] / w.sum(), rtol=1e-9, atol=1e-15)


def _expected_vs_observed(truth, g, events):
  """(expected, variance, observed) counts of "same category as the last purchase" and "a
  complement of the last purchase" over events with t >= 1, under the recomputed softmax."""
  category = truth["item_category"]
  result = np.zeros((2, 3))
  for e in events:
    p = reference_weights(truth, g, e)
    p /= p.sum()
    last = truth["event_item"][e - 1]
    for row, hit in enumerate((category == category[last],
                               np.isin(np.arange(len(p)), truth["complements"][last]))):
      q = p[hit].sum()
      result[row] += (q, q * (1 - q), hit[truth["event_item"][e]])
  return result


def test_sampler_draws_from_the_softmax(generated):
  config, truth, _ = generated
  pos = np.arange(len(truth["event_item"])) - np.repeat(truth["event_start"],
                                                        truth["event_count"])
  events = np.random.default_rng(1).choice(np.flatnonzero(pos >= 1), 3000, replace=False)
  for expected, variance, observed in _expected_vs_observed(truth, config.generator, events):
    assert abs(observed - expected) < 4 * math.sqrt(variance), (observed, expected)


def test_chunked_and_dense_sampling_paths(monkeypatch, tmp_path):
  """Many chunks and only dense draws: still the recorded normaliser of the softmax."""
  monkeypatch.setattr(amazon_like, "CHUNK_ELEMENTS", 64 * 10)  # 64 users a chunk
  monkeypatch.setattr(amazon_like, "MIN_ACCEPTANCE", 2.0)
  g = tiny_generator(num_users=300, num_items=100, max_reviews_per_user=40)
  world = amazon_like.generate(g, str(tmp_path / "raw"))
  truth = {f.name: getattr(world, f.name) for f in dataclasses.fields(world)}
  for e in np.random.default_rng(2).choice(len(world.event_item), 50, replace=False):
    w = reference_weights(truth, g, e)
    assert w[world.event_item[e]] > 0
    np.testing.assert_allclose(world.log_z[e], np.log(w.sum()), rtol=1e-10)
  events = np.flatnonzero(np.arange(len(world.event_item)) - world.event_start[world.event_user])
  for expected, variance, observed in _expected_vs_observed(truth, g, events[:1500]):
    assert abs(observed - expected) < 4 * math.sqrt(variance), (observed, expected)


# ----------------------------------------------------------------------------- raw files


def test_raw_files_parse_without_bad_rows(generated):
  config, truth, _ = generated
  paths = amazon_like.raw_paths(config.raw_dir, config.generator.name)
  raw = amazon_raw.read_reviews(paths["reviews"])
  assert raw.counts["parsed"] == raw.counts["lines"] == len(truth["event_item"])
  wanted = {asin: i for i, asin in enumerate(raw.item_keys)}
  item_index = {name: i for i, name in enumerate(truth["item_names"].tolist())}
  for protocol in amazon.PROTOCOLS:
    categories, counts = amazon_raw.read_metadata(paths["meta"], wanted, protocol)
    assert counts["malformed_lines"] == counts["missing_fields"] == 0
    assert counts["items_found"] == len(wanted)
    assert counts["skipped_unreviewed"] == len(truth["item_names"]) - len(wanted)
    width = len(str(config.generator.num_categories - 1))
    assert categories == [f"Category {truth['item_category'][item_index[a]]:0{width}d}"
                          for a in raw.item_keys]
  reviews, stats = amazon.load_reviews(paths["reviews"], paths["meta"], "mian", 0.0)
  assert stats["bad_row_ratio"] == {"reviews": 0.0, "metadata": 0.0}
  assert reviews.num_users == config.generator.num_users


def test_five_core_strict_days_and_no_repeated_purchase(generated):
  config, _, _ = generated
  paths = amazon_like.raw_paths(config.raw_dir, config.generator.name)
  raw = amazon_raw.read_reviews(paths["reviews"])
  assert np.bincount(raw.user).min() >= 5
  assert len(np.unique(raw.user * len(raw.item_keys) + raw.item)) == len(raw.user)
  assert len(np.unique(raw.user * 10 ** 6 + raw.time // amazon.SECONDS_PER_DAY)) == len(raw.user)
  assert np.all(raw.time % amazon.SECONDS_PER_DAY == 0)
  years = encoding.calendar("year", raw.time)
  assert years.min() >= 2008 and years.max() <= 2014
  mean = np.bincount(raw.user).mean()
  assert abs(mean - config.generator.mean_reviews_per_user) < 1.0


def test_deterministic_for_a_seed(tmp_path):
  g = tiny_generator(num_users=200, num_items=80, max_reviews_per_user=40)
  for name in ("a", "b"):
    amazon_like.generate(g, str(tmp_path / name))
  g.seed = 1
  amazon_like.generate(g, str(tmp_path / "c"))
  def read(directory, key):
    with open(amazon_like.raw_paths(str(tmp_path / directory), g.name)[key], "rb") as f:
      return f.read()
  for key in ("reviews", "meta"):
    assert read("a", key) == read("b", key)
  assert read("a", "reviews") != read("c", "reviews")
  truths = [np.load(amazon_like.raw_paths(str(tmp_path / d), g.name)["truth"]) for d in "ab"]
  for name in truths[0].files:
    np.testing.assert_array_equal(truths[0][name], truths[1][name])


# ----------------------------------------------------------------------------- the story's effects


def test_seasonality_and_sequence_are_in_the_data(generated):
  config, truth, _ = generated
  paths = amazon_like.raw_paths(config.raw_dir, config.generator.name)
  reviews, _ = amazon.load_reviews(paths["reviews"], paths["meta"], "mian", 0.0)
  category = reviews.item_category[reviews.item]  # dense ids = generated ids (sorted names)
  month = encoding.calendar("month", reviews.time) - 1  # 0..11
  gift = int(np.argmax(truth["season"][:, 11] - truth["season"][:, 5]))
  share = lambda months: (category[np.isin(month, months)] == gift).mean()  # noqa: E731
  assert share([10, 11]) > 2 * share(list(range(2, 9)))
  # The next purchase depends on the previous one beyond the user's own mix of purchases:
  # compared with the same purchases in a random order within each user.
  user = np.repeat(np.arange(len(truth["event_count"])), truth["event_count"])
  shuffled = np.lexsort((np.random.default_rng(0).random(len(user)), user))
  actual, baseline = (_sequence_rates(truth, order) for order in (np.arange(len(user)), shuffled))
  assert actual[0] > 1.2 * baseline[0], (actual, baseline)  # the same category again
  assert actual[1] > 0.05 and actual[1] > 3 * baseline[1], (actual, baseline)  # a complement


def _sequence_rates(truth, order):
  """(same category as the previous purchase, a complement of it): shares over the purchases
  with a previous one, the users' purchases taken in `order` (a permutation within users)."""
  item = truth["event_item"][order]
  category = truth["item_category"][item]
  later = np.flatnonzero(np.arange(len(item)) - np.repeat(truth["event_start"],
                                                          truth["event_count"]) >= 1)
  return ((category[later] == category[later - 1]).mean(),
          (truth["complements"][item[later - 1]] == item[later, None]).any(1).mean())


# ----------------------------------------------------------------------------- prepared data


def test_prepared_click_prob_and_oracle_auc(generated):
  config, truth, splits = generated
  for split in schema_lib.SPLITS:
    p = splits[split]["extra.click_prob"]
    assert p.dtype == np.float32 and p.shape == splits[split]["label"].shape
    assert np.all((p > 0) & (p <= 1))
  test = splits["test"]
  oracle = metrics.auc(test["label"], test["extra.click_prob"])
  train = splits["train"]
  counts = np.bincount(train["item.item_id"][train["label"] == 1],
                       minlength=test["item.item_id"].max() + 1)
  popularity = metrics.auc(test["label"], counts[test["item.item_id"]])
  assert oracle > 0.75
  assert oracle > popularity + 0.03, (oracle, popularity)


def test_click_prob_is_the_posterior_of_the_pair(generated):
  """Test rows of the mian protocol: the user's last review, its uniform negative."""
  config, truth, splits = generated
  test = splits["test"]
  user_names = np.sort(truth["user_names"])
  reviewed = np.sort(truth["item_names"][np.unique(truth["event_item"])])
  index = {name: i for i, name in enumerate(truth["item_names"].tolist())}
  by_name = {name: i for i, name in enumerate(truth["user_names"].tolist())}
  for row in range(0, 40, 2):
    user = by_name[user_names[test["group_id"][row]]]
    e = truth["event_start"][user] + truth["event_count"][user] - 1
    w = reference_weights(truth, config.generator, e)
    q = 1.0 / (len(reviewed) - truth["event_count"][user])
    for r in (row, row + 1):
      item = index[reviewed[test["item.item_id"][r] - schema_lib.NUM_RESERVED_IDS]]
      p = w[item] / w.sum()
      np.testing.assert_allclose(test["extra.click_prob"][r], p / (p + q), rtol=1e-5)
    assert test["label"][row] == 1 and truth["event_item"][e] == index[
        reviewed[test["item.item_id"][row] - schema_lib.NUM_RESERVED_IDS]]


def test_dien_protocol_through_the_source_registry():
  """data.source="amazon_like" with the default raw_dir (the private test cache)."""
  config = data_config("", protocol="dien", num_users=300, num_items=120,
                       max_reviews_per_user=40)
  directory, schema = data_lib.ensure_prepared(config)
  assert schema.extra_columns == ("click_prob",)
  raw_dir = amazon_like.default_raw_dir(config.generator)
  assert raw_dir.startswith(data_lib.cache_root()) and os.path.isdir(raw_dir)
  splits = load_prepared(directory)
  for split in ("valid", "test"):  # valid: users held out as the test users are, not a copy
    p = splits[split]["extra.click_prob"]
    assert np.all((p >= 0) & (p <= 1)) and p[0::2].mean() > p[1::2].mean()
  users = {s: set(splits[s]["group_id"].tolist()) for s in schema_lib.SPLITS}
  assert users["valid"] and not users["valid"] & (users["test"] | users["train"])


# ----------------------------------------------------------------------------- configs


def test_size_configs():
  books = amazon_like_config.get_config("size=books").data.generator
  assert (books.num_users, books.num_items, books.num_categories) == (603_668, 367_982, 1_600)
  assert 8.5e6 < books.num_users * books.mean_reviews_per_user < 9.3e6
  default = amazon_like_config.get_config().data
  assert default.source == "amazon_like" and default.protocol == "mian"
  g = default.generator
  assert (g.num_users, g.num_items, g.num_categories) == (20_000, 4_000, 40)
  assert 2.5e5 < g.num_users * g.mean_reviews_per_user < 2.8e5
  for size in amazon_like_config.SIZES:
    amazon_like.check_settings(amazon_like_config.get_generator(size))
  with pytest.raises(ValueError):
    amazon_like_config.get_config("size=huge")
  bad = tiny_generator(max_reviews_per_user=400)
  with pytest.raises(ConfigError):
    amazon_like.check_settings(bad)


def test_raw_files_of_other_settings_are_refused(tmp_path):
  config = data_config(tmp_path / "raw", num_users=100, num_items=60, max_reviews_per_user=30)
  amazon_like.generate(config.generator, config.raw_dir)
  config.generator.seed = 7
  with pytest.raises(DataError, match="other settings"):
    amazon_like.prepare(config, str(tmp_path / "prepared"))
