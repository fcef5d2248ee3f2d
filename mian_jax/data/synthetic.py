"""A synthetic CTR data set with planted structure of the kinds MIAN exists to capture, a
deterministic function of `config.data.synthetic`; each click probability is stored
(`extra.click_prob`) for the oracle AUC. Terms (a)-(d) of the logit: docs/data.md."""

from __future__ import annotations

import functools

import numpy as np
from ml_collections import ConfigDict

from mian_jax.data import interaction_log, vocab
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError

# Sizes of the profile and context vocabularies (values, before the two reserved ids).
NUM_GENDERS = 2
NUM_AGE_GROUPS = 7
NUM_SEASONS = 4
NUM_HOURS = 24
NUM_WEEKDAYS = 7
NUM_RECENCY_BUCKETS = 6  # days_since_last: 0-2 active, 3-5 stale


def _low_rank_table(rng: np.random.Generator, rows: int, cols: int, rank: int) -> np.ndarray:
  """A [rows, cols] table of rank `rank`, standardised to zero mean and unit std."""
  table = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols))
  return (table - table.mean()) / table.std()


class _World:
  """The latent users, items and interaction tables shared by all splits."""

  def __init__(self, c: ConfigDict, rng: np.random.Generator):
    self.c = c
    self.item_category = rng.integers(c.num_categories, size=c.num_items)
    self.item_bias = rng.normal(0.0, c.item_bias_std, size=c.num_items)
    self.items_by_category = np.argsort(self.item_category, kind="stable")
    self.category_counts = np.bincount(self.item_category, minlength=c.num_categories)
    if (self.category_counts == 0).any():
      raise ConfigError("data.synthetic: every category needs at least one item; "
                        "raise num_items or lower num_categories")
    self.category_starts = np.concatenate([[0], np.cumsum(self.category_counts)[:-1]])
    u = c.num_users
    self.occupation = rng.integers(c.num_occupations, size=u)
    self.age_group = rng.integers(NUM_AGE_GROUPS, size=u)
    self.gender = rng.integers(NUM_GENDERS, size=u)
    self.current_interest = rng.integers(c.num_categories, size=(u, c.num_interests))
    self.old_interest = rng.integers(c.num_categories, size=(u, c.num_interests))
    self.inactive = rng.random(u) < c.inactive_user_share
    # (b), (c): one table per user / context field, and which field drives each category.
    self.user_tables = [_low_rank_table(rng, n, c.num_categories, c.interaction_rank)
                        for n in (NUM_GENDERS, NUM_AGE_GROUPS, c.num_occupations)]
    self.context_tables = [_low_rank_table(rng, n, c.num_categories, c.interaction_rank)
                           for n in (NUM_SEASONS, NUM_HOURS, NUM_WEEKDAYS)]
    self.user_field_of = rng.integers(3, size=c.num_categories)
    self.context_field_of = rng.integers(3, size=c.num_categories)
    self.relevance_table = _low_rank_table(rng, c.num_categories, c.num_categories,
                                           c.interaction_rank)

  def draw_items(self, rng, categories):
    """A uniformly random item of each given category (any shape)."""
    offsets = (rng.random(categories.shape) * self.category_counts[categories]).astype(np.int64)
    return self.items_by_category[self.category_starts[categories] + offsets]


def _interest_draw(rng, interests, users, shape, focus):
  """Categories drawn from the users' interests with prob. `focus`, else uniformly."""
  c = interests.shape[1]
  picked = interests[users[:, None], rng.integers(c, size=shape)]
  uniform = rng.integers(interests.max() + 1, size=shape)
  return np.where(rng.random(shape) < focus, picked, uniform)


def _selected(tables, which, values, category):
  """tables[which[n]][values[which[n]][n], category[n]] for every example n."""
  out = np.zeros(len(category))
  for j, (table, value) in enumerate(zip(tables, values)):
    out = np.where(which == j, table[value, category], out)
  return out


def _generate_split(world: _World, rng: np.random.Generator, n: int, max_seq_len: int):
  c = world.c
  users = rng.integers(c.num_users, size=n)
  inactive = world.inactive[users]
  stale = inactive & (rng.random(n) < 0.5)  # inactive users: half stale, half short histories
  short = inactive & ~stale

  # Behaviours are drawn with position t = 0 the oldest (age = number of later behaviours) and
  # stored newest first (schema.newest_first) at the end.
  lengths = rng.integers(c.min_seq_len, max_seq_len + 1, size=n)
  lengths = np.where(short, rng.integers(0, c.short_seq_len + 1, size=n), lengths)
  t = np.arange(max_seq_len)[None, :]
  age = lengths[:, None] - 1 - t
  shape = (n, max_seq_len)
  recent = _interest_draw(rng, world.current_interest, users, shape, c.interest_focus)
  old = _interest_draw(rng, world.old_interest, users, shape, c.interest_focus)
  from_current = (age < c.recent_window) & ~stale[:, None]
  hist_category = np.where(from_current, recent, old)
  hist_item = world.draw_items(rng, hist_category)
  valid = t < lengths[:, None]

  # Candidates: half from the current interests, half uniformly random items.
  related = rng.random(n) < c.related_candidate_share
  cand_category = np.where(related,
                           world.current_interest[users, rng.integers(c.num_interests, size=n)],
                           rng.integers(c.num_categories, size=n))
  cand_item = world.draw_items(rng, cand_category)

  season = rng.integers(NUM_SEASONS, size=n)
  hour = rng.integers(NUM_HOURS, size=n)
  weekday = rng.integers(NUM_WEEKDAYS, size=n)
  half = NUM_RECENCY_BUCKETS // 2
  days_since_last = np.where(stale, rng.integers(half, NUM_RECENCY_BUCKETS, size=n),
                             rng.integers(0, half, size=n))

  decay = np.where(valid, c.recency_decay ** np.maximum(age, 0), 0.0)
  kernel = world.relevance_table[hist_category, cand_category[:, None]]
  relevance = (decay * kernel).sum(1) / np.maximum(decay.sum(1), 1e-12)
  relevance = np.where(stale | (lengths == 0), 0.0, relevance)
  logit = (c.bias + world.item_bias[cand_item]
           + c.relevance_weight * relevance
           + c.user_weight * _selected(world.user_tables, world.user_field_of[cand_category],
                                       (world.gender[users], world.age_group[users],
                                        world.occupation[users]), cand_category)
           + c.context_weight * _selected(world.context_tables,
                                          world.context_field_of[cand_category],
                                          (season, hour, weekday), cand_category))
  click_prob = 1.0 / (1.0 + np.exp(-logit))
  label = (rng.random(n) < click_prob).astype(np.float32)

  ids = lambda x: (x + schema_lib.NUM_RESERVED_IDS).astype(np.int32)  # noqa: E731
  hist = lambda x: schema_lib.newest_first(  # noqa: E731
      np.where(valid, ids(x), schema_lib.PAD_ID).astype(np.int32), lengths)
  return {
      "item.item_id": ids(cand_item),
      "item.category": ids(cand_category),
      "hist.item_id": hist(hist_item),
      "hist.category": hist(hist_category),
      "hist_len": lengths.astype(np.int32),
      **{f"user.{f}": ids(getattr(world, f)[users]) for f in ("gender", "age_group", "occupation")},
      "context.season": ids(season),
      "context.hour": ids(hour),
      "context.weekday": ids(weekday),
      "context.days_since_last": ids(days_since_last),
      "label": label,
      "group_id": users.astype(np.int64),
      "extra.click_prob": click_prob.astype(np.float32),
  }


def check_settings(c: ConfigDict, max_seq_len: int) -> None:
  """Raises ConfigError (one line) if the history lengths cannot be drawn: active users get
  [min_seq_len, max_seq_len] behaviours, inactive "short" ones [0, short_seq_len]."""
  problems = [f"{key}={c[key]} must lie in [0, data.max_seq_len={max_seq_len}]"
              for key in ("min_seq_len", "short_seq_len") if not 0 <= c[key] <= max_seq_len]
  if problems:
    raise ConfigError(f"data.synthetic: {' and '.join(problems)} (history lengths are drawn up "
                      f"to max_seq_len); lower them, e.g. --config.data.synthetic.min_seq_len="
                      f"{max_seq_len} --config.data.synthetic.short_seq_len="
                      f"{min(c.short_seq_len, max_seq_len)}, or raise data.max_seq_len")


def generate(c: ConfigDict, max_seq_len: int):
  """Returns (schema, {split: columns}) for the synthetic settings `c`."""
  check_settings(c, max_seq_len)
  world = _World(c, np.random.default_rng(c.seed))
  splits = {split: _generate_split(world, np.random.default_rng([c.seed, i + 1]),
                                   c[f"num_{split}"], max_seq_len)
            for i, split in enumerate(schema_lib.SPLITS)}
  cat = lambda name, size: schema_lib.Field(  # noqa: E731
      name, "categorical", size + schema_lib.NUM_RESERVED_IDS)
  features = schema_lib.FeatureSpec(
      item_fields=(cat("item_id", c.num_items), cat("category", c.num_categories)),
      behavior_fields=("item_id", "category"), max_seq_len=max_seq_len,
      user_fields=(cat("gender", NUM_GENDERS), cat("age_group", NUM_AGE_GROUPS),
                   cat("occupation", c.num_occupations)),
      context_fields=(cat("season", NUM_SEASONS), cat("hour", NUM_HOURS),
                      cat("weekday", NUM_WEEKDAYS), cat("days_since_last", NUM_RECENCY_BUCKETS)))
  num_examples = tuple((s, c[f"num_{s}"]) for s in schema_lib.SPLITS)
  return schema_lib.Schema(features, num_examples, ("click_prob",),
                           f"synthetic(seed={c.seed})"), splits


def prepare(data_config: ConfigDict, directory: str) -> None:
  """Generates the synthetic data set and writes it (atomically) to `directory`."""
  schema, splits = generate(data_config.synthetic, data_config.max_seq_len)
  identity = {name: [str(k) for k in range(x.vocab_size - schema_lib.NUM_RESERVED_IDS)]
              for name, x in schema.features.fields().items()}  # raw "k" -> id k + 2
  note = ("synthetic: no raw values; a field's raw value is the generator's 0-based index k "
          "(\"k\"), its id k + 2 (identity maps)")
  interaction_log.write_with_stats(directory, schema, splits, {"source": "synthetic"},
                                   functools.partial(vocab.write_vocabularies, note=note,
                                                     vocabularies=identity))
