"""The Amazon-like benchmark: synthetic shopping histories as raw Amazon 2014 files, prepared
by the Amazon pipeline with `extra.click_prob`, each example's Bayes-optimal probability of
being the positive of its pair (docs/data.md, "Amazon-like benchmark", gives the notation)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from mian_jax.data import amazon
from mian_jax.errors import ConfigError, DataError
from mian_jax.fileio import cache_root

DAYS_PER_YEAR = 365.25
# Month-of-year shapes (January = 0) of the seasonal categories.
GIFT_PROFILE = np.array([0.0] * 10 + [0.5, 1.0])  # Nov half, Dec full
SUMMER_PROFILE = np.cos(2 * np.pi * (np.arange(12) - 6) / 12)  # July +1, January -1
CHUNK_ELEMENTS = 1 << 22  # elements per array of one chunk of users (bounds sampler memory)
PAIR_CHUNK = 1 << 18  # (review, item) pairs per chunk when computing probabilities
# Rows whose acceptance probability is below MIN_ACCEPTANCE, or still rejected after
# MAX_REJECTION_ROUNDS, are drawn from their dense weights over all items instead.
MIN_ACCEPTANCE = 0.05
MAX_REJECTION_ROUNDS = 64
WRITE_CHUNK = 200_000  # lines per write
SUMMARIES = ("Disappointing", "Not great", "OK", "Good", "Great")
TEXTS = ("Did not work for me.", "Expected more.", "Does the job.", "Works well.",
         "Exactly what I needed.")


@dataclasses.dataclass
class World:
  """The latent parameters and the R generated reviews (user-major, oldest first):
  item_category [I] in [0, C); item_share [I] pi within its category; season [C, 12] log
  factors; transition [C, C] T; complements [I, K]; favourites [U, F] distinct categories;
  taste_start, taste_end [U, F]; event_start, event_count [U]; event_item [R]; event_day [R]
  days since 1970-01-01; log_z [R] log Z; complement_mass [W] h_k / K."""
  user_names: np.ndarray
  item_names: np.ndarray
  item_category: np.ndarray
  item_share: np.ndarray
  season: np.ndarray
  transition: np.ndarray
  complements: np.ndarray
  favourites: np.ndarray
  taste_start: np.ndarray
  taste_end: np.ndarray
  event_start: np.ndarray
  event_count: np.ndarray
  event_item: np.ndarray
  event_day: np.ndarray
  log_z: np.ndarray
  taste_floor: float
  taste_drift_days: float
  transition_weight: float
  complement_mass: np.ndarray
  settings_key: str

  def __post_init__(self):
    self.num_categories, self.num_items = len(self.season), len(self.item_category)

  @functools.cached_property
  def first_day(self) -> np.ndarray:  # [U] day of each user's first review (d0 of the drift)
    return self.event_day[self.event_start]

  @functools.cached_property
  def season_factor(self) -> np.ndarray:  # [12, C] exp(season), month-major
    return np.exp(self.season.T)

  @functools.cached_property
  def event_user(self) -> np.ndarray:  # [R]
    return np.repeat(np.arange(len(self.event_count)), self.event_count)

  @functools.cached_property
  def purchase_index(self) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted keys user * I + item of all reviews, each one's review)."""
    keys = self.event_user.astype(np.int64) * self.num_items + self.event_item
    order = np.argsort(keys, kind="stable")
    return keys[order], order


def load_world(path: str) -> World:
  cast = {"str": str, "float": float}  # field types, as strings (postponed annotations)
  with np.load(path, allow_pickle=False) as npz:
    return World(**{f.name: cast.get(f.type, np.asarray)(npz[f.name])
                    for f in dataclasses.fields(World)})


def generator_key(g: ConfigDict) -> str:
  """A hash of every generator setting: names the raw directory, stored in the truth."""
  blob = json.dumps(g.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_settings(g: ConfigDict) -> None:
  """Raises ConfigError for generator settings that cannot produce a valid data set."""
  window = _day(g.last_date) - _day(g.first_date)
  checks = [
      (g.num_categories * g.min_items_per_category <= g.num_items,
       "num_items < num_categories * min_items_per_category"),
      (min(g.min_items_per_category, g.num_complement_items, g.complement_window) >= 1,
       "min_items_per_category, num_complement_items and complement_window must be >= 1 "
       "(complement_weight=0 turns complements off)"),
      (1 <= g.num_favourite_categories <= g.num_categories,
       "num_favourite_categories must lie in [1, num_categories]"),
      (g.min_reviews_per_user < g.mean_reviews_per_user - 0.5,
       "mean_reviews_per_user must exceed min_reviews_per_user + 0.5"),
      (g.min_reviews_per_user <= g.max_reviews_per_user < min(g.num_items, window + 1),
       "need min_reviews_per_user <= max_reviews_per_user < num_items and < the number of days "
       "from first_date to last_date"),
      (0 <= g.gift_category_share + g.summer_category_share <= 1,
       "gift_category_share + summer_category_share must lie in [0, 1]"),
      (0 < g.taste_floor <= 1 and 0 <= g.repeat_share <= 1 and 0 <= g.complement_cross_share <= 1,
       "taste_floor must lie in (0, 1], repeat_share and complement_cross_share in [0, 1]"),
      (len(g.rating_probs) == 5 and abs(sum(g.rating_probs) - 1) <= 1e-9,
       "rating_probs must be 5 probabilities summing to 1"),
  ]
  problems = [message for ok, message in checks if not ok]
  if problems:
    raise ConfigError("data.generator: " + "; ".join(problems))


def _day(date: str) -> int:
  return int(np.datetime64(date, "D").astype(np.int64))


def _top_k(rng: np.random.Generator, log_weights: np.ndarray, k: int) -> np.ndarray:
  """[N, k] distinct indices per row of log_weights [N, C] (-inf: never), by Gumbel top-k."""
  keys = log_weights + rng.gumbel(size=log_weights.shape)
  return np.argpartition(-keys, k - 1, axis=1)[:, :k]


def _category_cumulative(item_category: np.ndarray, item_share: np.ndarray):
  """(items sorted by category [I], cumulative [I], end [C]): the items of category c are
  items[end[c-1]:end[c]], and cumulative runs from c (exclusive) to c + 1 over them, so an item
  of c with probability pi is items[searchsorted(cumulative, c + u, "right")], u ~ U[0, 1)."""
  order = np.argsort(item_category, kind="stable")
  cats, size = item_category[order], np.bincount(item_category)
  end = np.cumsum(size)
  total = np.cumsum(item_share[order])
  cumulative = cats + (total - np.concatenate([[0.0], total])[end - size][cats])
  cumulative[end - 1] = np.arange(len(end)) + 1.0  # exactly c + 1 at each category's end
  return order, cumulative, end


def _draw_in_categories(rng, categories, order, cumulative, end):
  """A popularity-weighted item of each given category ([N] -> [N])."""
  index = np.searchsorted(cumulative, categories + rng.random(len(categories)), side="right")
  return order[np.minimum(index, end[categories] - 1)]


def make_catalogue(g: ConfigDict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Categories, popularity, seasons, transitions and complements (docs/data.md)."""
  num_c, num_i = g.num_categories, g.num_items
  size_share = rng.dirichlet(np.full(num_c, g.category_size_concentration))
  sizes = g.min_items_per_category + rng.multinomial(
      num_i - num_c * g.min_items_per_category, size_share)
  item_category = rng.permutation(np.repeat(np.arange(num_c), sizes))
  raw = np.exp(rng.normal(0.0, g.popularity_sigma, num_i))
  item_share = raw / np.bincount(item_category, raw, num_c)[item_category]
  # Seasons: a fixed number of gift and summer categories, the rest flat with noise.
  num_gift = round(g.gift_category_share * num_c)
  num_summer = round(g.summer_category_share * num_c)
  shuffled = rng.permutation(num_c)
  season = rng.normal(0.0, g.season_noise, (num_c, 12))
  season[shuffled[:num_gift]] += g.gift_amplitude * GIFT_PROFILE
  season[shuffled[num_gift:num_gift + num_summer]] += g.summer_amplitude * SUMMER_PROFILE
  # Category transitions: repeat_share on itself, the rest over complementary categories drawn
  # in proportion to their size (big categories complement many).
  num_cc = min(g.num_complement_categories, num_c - 1)
  log_size = np.broadcast_to(np.log(sizes / num_i), (num_c, num_c)).copy()
  np.fill_diagonal(log_size, -np.inf)
  transition = np.zeros((num_c, num_c))
  if num_cc:
    comp_cats = _top_k(rng, log_size, num_cc)
    np.put_along_axis(transition, comp_cats, (1.0 - g.repeat_share) / num_cc, axis=1)
  transition[np.arange(num_c), np.arange(num_c)] += g.repeat_share if num_cc else 1.0
  # Item complements: from a complementary category (complement_cross_share) or the item's
  # own, popular items more likely; an item drawn as its own complement is redrawn.
  order, cumulative, end = _category_cumulative(item_category, item_share)
  k = g.num_complement_items
  own = np.repeat(item_category, k)
  target = own
  if num_cc:
    cross = rng.random(own.size) < g.complement_cross_share
    target = np.where(cross, comp_cats[own, rng.integers(num_cc, size=own.size)], own)
  complements = _draw_in_categories(rng, target, order, cumulative, end)
  self_item = np.repeat(np.arange(num_i), k)
  for _ in range(MAX_REJECTION_ROUNDS):
    redo = np.flatnonzero(complements == self_item)
    if not len(redo):
      break
    complements[redo] = _draw_in_categories(rng, target[redo], order, cumulative, end)
  return {"item_category": item_category, "item_share": item_share, "season": season,
          "transition": transition, "complements": complements.reshape(num_i, k),
          "category_size": sizes}


def make_users(g: ConfigDict, rng: np.random.Generator,
               category_size: np.ndarray) -> dict[str, np.ndarray]:
  """Favourite categories (in proportion to category size) and start / end taste weights."""
  rows = max(1, CHUNK_ELEMENTS // g.num_categories)
  log_size = np.log(category_size / category_size.sum())
  favourites = np.concatenate([
      _top_k(rng, np.broadcast_to(log_size, (min(rows, g.num_users - lo), g.num_categories)),
             g.num_favourite_categories)
      for lo in range(0, g.num_users, rows)])
  alpha = np.full(g.num_favourite_categories, g.taste_concentration)
  return {"favourites": favourites, "taste_start": rng.dirichlet(alpha, g.num_users),
          "taste_end": rng.dirichlet(alpha, g.num_users)}


def make_schedule(g: ConfigDict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(count [U], day [R]): reviews per user and their strictly increasing days, user-major."""
  u, sigma = g.num_users, g.activity_sigma
  # floor(X) of a log-normal X has mean about E[X] - 1/2.
  mu = np.log(g.mean_reviews_per_user - g.min_reviews_per_user + 0.5) - sigma ** 2 / 2
  extra = np.floor(rng.lognormal(mu, sigma, u)).astype(np.int64)
  count = np.minimum(g.min_reviews_per_user + extra, g.max_reviews_per_user)
  user = np.repeat(np.arange(u), count)
  start = np.concatenate([[0], np.cumsum(count)[:-1]])
  pos = np.arange(len(user)) - start[user]
  typical = g.gap_median_days * np.exp(rng.normal(0.0, g.gap_user_sigma, u))
  gap = np.maximum(1, np.rint(typical[user] * rng.lognormal(0.0, g.gap_sigma, len(user))))
  gap[pos == 0] = 0
  # A span longer than the window is compressed: gap -> 1 + floor((gap - 1) * scale).
  first, last = _day(g.first_date), _day(g.last_date)
  window = last - first
  span = np.bincount(user, gap, u)
  scale = np.where(span > window, (window - (count - 1)) / np.maximum(span - (count - 1), 1), 1.0)
  gap = np.where(pos == 0, 0, 1 + np.floor((gap - 1) * scale[user]))
  offset = np.cumsum(gap)
  offset -= offset[start][user]
  span = offset[start + count - 1]
  # First day: density proportional to exp(growth * years) on [first, last - span].
  room = window - span
  growth = g.growth_per_year / DAYS_PER_YEAR
  v = rng.random(u)
  begin = np.log1p(v * np.expm1(growth * room)) / growth if growth > 0 else v * room
  begin = first + np.minimum(np.floor(begin), room)
  return count, (begin[user] + offset).astype(np.int64)


def category_appeal(world: World, events: np.ndarray, last: np.ndarray,
                    category: np.ndarray | None = None) -> np.ndarray:
  """a_u(d, c) = exp(season[c, m(d)]) (taste_u(d)[c] + lambda T[c_prev, c]) at review events [N]
  after purchases last [N] (-1: none); returns [N] at category [N], or [N, C] (None)."""
  user, day = world.event_user[events], world.event_day[events]
  f = -np.expm1(-(day - world.first_day[user]) / world.taste_drift_days)[:, None]
  weights = (1.0 - f) * world.taste_start[user] + f * world.taste_end[user]  # [N, F]
  floor = world.taste_floor / world.num_categories
  month = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12  # UTC
  prev, has_prev = world.item_category[np.maximum(last, 0)], last >= 0
  if category is None:
    taste = np.full((len(user), world.num_categories), floor)
    np.put_along_axis(taste, world.favourites[user], floor + (1.0 - world.taste_floor) * weights,
                      axis=1)  # the favourites of a user are distinct
    transition = np.where(has_prev[:, None], world.transition[prev], 0.0)
    season = world.season_factor[month]
  else:
    taste = floor + (1.0 - world.taste_floor) * (
        weights * (world.favourites[user] == category[:, None])).sum(1)
    transition = np.where(has_prev, world.transition[prev, category], 0.0)
    season = world.season_factor[month, category]
  return season * (taste + world.transition_weight * transition)


def complement_slots(world: World, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(items [B, W*K] boosted by recent purchases, -1: none; their mass h_k / K [B, W*K]);
  recent: [B, W] the last W purchases, newest first, -1: none."""
  k = world.complements.shape[1]
  has = recent >= 0
  items = np.where(has[..., None], world.complements[np.maximum(recent, 0)], -1)
  mass = np.where(has, world.complement_mass[None, :recent.shape[1]], 0.0)
  return items.reshape(len(recent), -1), np.repeat(mass, k, axis=1)


def _recent_purchases(world: World, events: np.ndarray) -> np.ndarray:
  """[P, W] items of the W purchases before each event, newest first (-1: none)."""
  back = np.arange(1, len(world.complement_mass) + 1)
  pos = events - world.event_start[world.event_user[events]]
  index = events[:, None] - back[None, :]
  return np.where(back[None, :] <= pos[:, None], world.event_item[np.maximum(index, 0)], -1)


def purchase_weight(world: World, events: np.ndarray, items: np.ndarray) -> np.ndarray:
  """[P] the unnormalised weight w_i of item items[p] at review events[p] (index into event_*)."""
  recent = _recent_purchases(world, events)
  appeal = category_appeal(world, events, recent[:, 0], world.item_category[items])
  slots, mass = complement_slots(world, recent)
  weight = appeal * world.item_share[items] + (mass * (slots == items[:, None])).sum(1)
  keys, review = world.purchase_index  # 0 where the user bought the item at an earlier event
  wanted = world.event_user[events].astype(np.int64) * world.num_items + items
  at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
  return np.where((keys[at] == wanted) & (review[at] < events), 0.0, weight)


def purchase_probability(world: World, events: np.ndarray, items: np.ndarray) -> np.ndarray:
  """[P] the true probability that review events[p] is of item items[p]: w_i / Z."""
  events, items = np.asarray(events, np.int64), np.asarray(items, np.int64)
  out = np.empty(len(events))
  for lo in range(0, len(events), PAIR_CHUNK):
    e, i = events[lo:lo + PAIR_CHUNK], items[lo:lo + PAIR_CHUNK]
    out[lo:lo + len(e)] = purchase_weight(world, e, i) * np.exp(-world.log_z[e])
  return out


def _inverse_cdf(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
  """[N] one index per row of weights [N, K] (>= 0, positive sums), drawn proportionally."""
  cumulative = np.cumsum(weights, axis=1)
  target = (1.0 - rng.random(len(weights))) * cumulative[:, -1]  # in (0, total]
  return np.minimum((cumulative < target[:, None]).sum(1), weights.shape[1] - 1)


def _draw_unrestricted(rng, catalogue, appeal, slots, mass):
  """[N] items drawn by the weights without the not-bought factor: a category ~ appeal and an
  item ~ pi in it, or a complement slot ~ its mass."""
  n = len(appeal)
  from_category = rng.random(n) * (appeal.sum(1) + mass.sum(1)) < appeal.sum(1)
  category = _inverse_cdf(rng, appeal)
  by_category = _draw_in_categories(rng, category, *catalogue)
  if mass.shape[1] == 0:
    return by_category
  by_slot = slots[np.arange(n), _inverse_cdf(rng, mass)]  # unused where the slots have no mass
  return np.where(from_category, by_category, by_slot)


def _draw_dense(rng, world, appeal, slots, mass, bought):
  """[N] items drawn exactly from the dense weights over all items (bought ones at 0)."""
  out = np.empty(len(appeal), np.int64)
  rows_per_chunk = max(1, CHUNK_ELEMENTS // world.num_items)
  for lo in range(0, len(appeal), rows_per_chunk):
    a, s, m, b = (x[lo:lo + rows_per_chunk] for x in (appeal, slots, mass, bought))
    weight = a[:, world.item_category] * world.item_share[None, :]
    row = np.broadcast_to(np.arange(len(a))[:, None], s.shape)
    np.add.at(weight, (row[s >= 0], s[s >= 0]), m[s >= 0])
    row = np.broadcast_to(np.arange(len(a))[:, None], b.shape)
    weight[row[b >= 0], b[b >= 0]] = 0.0
    out[lo:lo + len(a)] = _inverse_cdf(rng, weight)
  return out


def _draw(rng, world, catalogue, appeal, slots, mass, bought, acceptance):
  """[N] items drawn from the choice softmax: unrestricted draws, redrawn while already
  bought (conditioning on "not bought" is exactly the restricted softmax), or dense draws."""
  out = np.full(len(appeal), -1, np.int64)
  todo = np.flatnonzero(acceptance >= MIN_ACCEPTANCE)
  for _ in range(MAX_REJECTION_ROUNDS):
    if not len(todo):
      break
    item = _draw_unrestricted(rng, catalogue, appeal[todo], slots[todo], mass[todo])
    ok = ~(bought[todo] == item[:, None]).any(1)
    out[todo[ok]] = item[ok]
    todo = todo[~ok]
  rest = np.flatnonzero(out < 0)
  if len(rest):
    out[rest] = _draw_dense(rng, world, appeal[rest], slots[rest], mass[rest], bought[rest])
  return out


def _sample_users(world: World, users: np.ndarray, catalogue, rng: np.random.Generator) -> None:
  """Samples world.event_item and log_z of `users` (by decreasing count), step t at once."""
  count = world.event_count[users]
  for t in range(count.max()):
    active = int((count > t).sum())  # a prefix, as the users are sorted by decreasing count
    events = world.event_start[users[:active]] + t
    bought = world.event_item[(events - t)[:, None] + np.arange(t)]  # [active, t]
    recent = _recent_purchases(world, events)
    appeal = category_appeal(world, events, recent[:, 0])
    slots, mass = complement_slots(world, recent)
    total = appeal.sum(1) + mass.sum(1)
    rows = np.arange(active)[:, None]
    bought_weight = (appeal[rows, world.item_category[bought]] * world.item_share[bought]
                     + (mass[:, None, :] * (slots[:, None, :] == bought[:, :, None])).sum(2))
    z = total - bought_weight.sum(1)
    world.log_z[events] = np.log(z)
    world.event_item[events] = _draw(rng, world, catalogue, appeal, slots, mass, bought, z / total)


def sample_purchases(world: World, seed: int) -> None:
  """Fills world.event_item and world.log_z, chunk by chunk of users (heaviest first)."""
  catalogue = _category_cumulative(world.item_category, world.item_share)
  order = np.argsort(-world.event_count, kind="stable")
  rows = max(1, CHUNK_ELEMENTS // world.num_categories)
  for chunk, lo in enumerate(range(0, len(order), rows)):
    _sample_users(world, order[lo:lo + rows], catalogue, np.random.default_rng([seed, 3, chunk]))


def _names(count: int, multiplier: int, offset: int, modulus: int, fmt: str) -> np.ndarray:
  # The multipliers are coprime with the moduli: the names are unique, and unsorted.
  values = (np.arange(count, dtype=np.int64) * multiplier + offset) % modulus
  return np.array([fmt.format(v) for v in values.tolist()])


def make_world(g: ConfigDict) -> World:
  """Draws the catalogue, the users, the schedule and then every purchase."""
  check_settings(g)
  rng = np.random.default_rng([g.seed, 1])
  catalogue = make_catalogue(g, rng)
  users = make_users(g, rng, catalogue.pop("category_size"))
  count, day = make_schedule(g, np.random.default_rng([g.seed, 2]))
  decay = g.complement_weight * g.complement_decay ** np.arange(g.complement_window)
  world = World(
      user_names=_names(g.num_users, 25_214_903_917, 0x2545F4914F6CD, 1 << 52, "A{:013X}"),
      item_names=_names(g.num_items, 6_364_136_223, 1_442_695_041, 10 ** 10, "{:010d}"),
      **catalogue, **users,
      event_start=np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64),
      event_count=count, event_item=np.full(len(day), -1, np.int64), event_day=day,
      log_z=np.zeros(len(day)), taste_floor=float(g.taste_floor),
      taste_drift_days=float(g.taste_drift_days), transition_weight=float(g.transition_weight),
      complement_mass=decay / g.num_complement_items, settings_key=generator_key(g))
  sample_purchases(world, g.seed)
  return world


def raw_paths(directory: str, name: str) -> dict[str, str]:
  return {"reviews": os.path.join(directory, f"reviews_{name}_5.json.gz"),
          "meta": os.path.join(directory, f"meta_{name}.json.gz"),
          "truth": os.path.join(directory, f"truth_{name}.npz")}


def _gzip_lines(path: str, lines) -> None:
  """Writes text lines gzipped, with mtime 0 so equal content gives equal bytes."""
  with gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as f:
    for block in lines:
      f.write(block.encode("utf-8"))


def _review_blocks(world: World, g: ConfigDict, rng: np.random.Generator):
  """The review lines (ordered by item, as the real files), WRITE_CHUNK at a time."""
  order = np.argsort(world.event_item, kind="stable")
  stars = rng.choice(5, size=len(order), p=np.asarray(g.rating_probs)) + 1
  user_names, item_names = world.user_names.tolist(), world.item_names.tolist()
  for lo in range(0, len(order), WRITE_CHUNK):
    e = order[lo:lo + WRITE_CHUNK]
    dates = np.datetime_as_string(world.event_day[e].astype("datetime64[D]")).tolist()
    yield "".join(
        f'{{"reviewerID": "{user_names[u]}", "asin": "{item_names[i]}", '
        f'"helpful": [0, 0], "reviewText": "{TEXTS[s - 1]}", "overall": {s}.0, '
        f'"summary": "{SUMMARIES[s - 1]}", "unixReviewTime": {d * amazon.SECONDS_PER_DAY}, '
        f'"reviewTime": "{ymd[5:7]} {int(ymd[8:])}, {ymd[:4]}"}}\n'
        for u, i, s, d, ymd in zip(world.event_user[e].tolist(), world.event_item[e].tolist(),
                                   stars[e].tolist(), world.event_day[e].tolist(), dates))


def _meta_blocks(world: World, g: ConfigDict, rng: np.random.Generator):
  """One Python-literal metadata line per item (reviewed or not), in asin order."""
  width = len(str(world.num_categories - 1))
  cat_share = np.bincount(world.item_category) / world.num_items
  expected = cat_share[world.item_category] * world.item_share
  rank = np.empty(world.num_items, np.int64)
  rank[np.argsort(-expected, kind="stable")] = np.arange(1, world.num_items + 1)
  price = np.round(np.exp(rng.normal(np.log(15.0), 0.8, world.num_items)), 2)
  names, categories = world.item_names.tolist(), world.item_category.tolist()
  complements, price, rank = world.complements.tolist(), price.tolist(), rank.tolist()
  order = np.argsort(world.item_names, kind="stable")
  for lo in range(0, len(order), WRITE_CHUNK):
    yield "".join(
        repr({"asin": names[i], "title": f"{g.name} item {names[i]}", "price": price[i],
              "salesRank": {g.name: rank[i]},
              "categories": [[g.name, f"Category {categories[i]:0{width}d}"]],
              "related": {"bought_together": [names[j] for j in complements[i]]}}) + "\n"
        for i in order[lo:lo + WRITE_CHUNK].tolist())


def generate(g: ConfigDict, directory: str) -> World:
  """Generates the world and writes its `raw_paths` into `directory` atomically (the truth last)."""
  started = time.time()
  world = make_world(g)
  sampled = time.time()
  directory = os.path.abspath(os.path.expanduser(directory))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
  try:
    paths = raw_paths(tmp, g.name)
    rng = np.random.default_rng([g.seed, 4])
    _gzip_lines(paths["reviews"], _review_blocks(world, g, rng))
    _gzip_lines(paths["meta"], _meta_blocks(world, g, rng))
    np.savez_compressed(paths["truth"], **{f.name: np.asarray(getattr(world, f.name))
                                           for f in dataclasses.fields(world)})
    try:
      os.rename(tmp, directory)
    except OSError:
      os.makedirs(directory, exist_ok=True)
      for key in ("reviews", "meta", "truth"):
        os.replace(paths[key], raw_paths(directory, g.name)[key])
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("amazon_like: %d users, %d items, %d reviews sampled in %.1fs, written to %s "
               "in %.1fs", len(world.event_count), world.num_items, len(world.event_item),
               sampled - started, directory, time.time() - sampled)
  return world


def default_raw_dir(g: ConfigDict) -> str:
  return os.path.join(cache_root(), "raw", f"amazon_like-{generator_key(g)}")


def _generated_index(names: np.ndarray, keys: np.ndarray, what: str) -> np.ndarray:
  """[K] index into `names` of each key, or DataError."""
  order = np.argsort(names)
  at = np.minimum(np.searchsorted(names[order], keys), len(names) - 1)
  if not np.array_equal(names[order][at], keys):
    raise DataError(f"amazon_like: a {what} of the raw files is not in the truth file")
  return order[at]


def click_prob_columns(world: World, protocol: str, reviews: amazon.Reviews, rows: np.ndarray,
                       negatives: np.ndarray) -> dict[str, np.ndarray]:
  """{"extra.click_prob": [2M] float32}: p / (p + q) of the positive (2k) and negative (2k+1)
  of target row rows[k]; p: the true purchase probability, q: that of the protocol's negative
  sampler: mian, din 1 / (I - n_u); dien count_i / R (ignoring its redraw of the target)."""
  user = _generated_index(world.user_names, reviews.user_keys, "reviewerID")[reviews.user[rows]]
  item_of = _generated_index(world.item_names, reviews.item_keys, "asin")
  events = world.event_start[user] + reviews.pos[rows]
  positive, negative = item_of[reviews.item[rows]], item_of[negatives]
  if (np.any(reviews.pos[rows] >= world.event_count[user])
      or not np.array_equal(world.event_item[events], positive)
      or not np.array_equal(world.event_day[events] * amazon.SECONDS_PER_DAY, reviews.time[rows])):
    raise DataError("amazon_like: the reviews do not match the truth file; delete the raw "
                    "directory to generate it again")
  if protocol == "dien":
    popular = np.bincount(reviews.item, minlength=reviews.num_items) / len(reviews.item)
  else:
    uniform = 1.0 / (reviews.num_items - reviews.count[reviews.user[rows]])
  columns = []
  for items, dense in ((positive, reviews.item[rows]), (negative, negatives)):
    p = purchase_probability(world, events, items)
    q = popular[dense] if protocol == "dien" else uniform
    columns.append(p / (p + q))
  return {"extra.click_prob": np.stack(columns, axis=1).reshape(-1).astype(np.float32)}


def prepare(data_config: ConfigDict, directory: str) -> None:
  """Generates the raw files if missing, then prepares them as Amazon's with extra.click_prob."""
  g = data_config.generator
  raw_dir = os.path.expanduser(data_config.raw_dir or default_raw_dir(g))
  paths = raw_paths(raw_dir, g.name)
  if not all(os.path.isfile(p) for p in paths.values()):
    generate(g, raw_dir)
  world = load_world(paths["truth"])
  if world.settings_key != generator_key(g):
    raise DataError(f"amazon_like: {raw_dir} holds files generated with other settings "
                    f"({world.settings_key} != {generator_key(g)}); use another data.raw_dir")
  amazon.prepare_from_files(
      data_config, paths["reviews"], paths["meta"], directory,
      extra_columns=functools.partial(click_prob_columns, world, data_config.protocol))
