"""Amazon 2014 5-core reviews (Books, Electronics) in the prepared format (docs/data.md): joins
the parsed raw files (`amazon_raw.py`) with categories and builds the examples of a protocol
(`data.protocol`) from the target review and the user's earlier reviews only."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from absl import logging
from ml_collections import ConfigDict

from mian_jax import encoding
from mian_jax.data import amazon_raw, interaction_log
from mian_jax.data import download as download_lib
from mian_jax.data import records as records_lib
from mian_jax.data import schema as schema_lib
from mian_jax.data import vocab
from mian_jax.errors import DataError, check_choice
from mian_jax.fileio import cache_root

SNAP_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
DATASETS = {"books": "Books", "electronics": "Electronics"}
PROTOCOLS = ("din", "dien", "mian")
SECONDS_PER_DAY = 86400
# user.activity: number k of earlier reviews -> bucket searchsorted(edges, k, "right"):
# 0 | 1 | 2-3 | 4-7 | 8-15 | 16-31 | 32-63 | 64+
ACTIVITY_EDGES = np.array([1, 2, 4, 8, 16, 32, 64])
# context.gap: whole days since the previous review -> 0 | 1 | 2-7 | 8-30 | 31-90 | 91-365 | 366+,
# and one more bucket (7) for "no previous review".
GAP_EDGES_DAYS = np.array([1, 2, 8, 31, 91, 366])
NO_PREVIOUS_GAP = len(GAP_EDGES_DAYS) + 1
# din and dien: the share of the eligible users whose target is held out for validation.
VALID_USER_SHARE = 0.1
VALID_STREAM = 1  # the validation users are drawn from default_rng([data.seed, VALID_STREAM])
# Target rows built and written at once: bounds memory; small, so the allocator reuses the pages.
EXAMPLE_BLOCK = 1 << 14
NEGATIVE_CHUNK = 1 << 20  # rows per chunk when checking negatives against the user's reviews
EXTRA_BLOCK = 1 << 19  # target rows per call of the extra columns (e.g. amazon_like's click_prob)


def raw_file_names(dataset: str) -> tuple[str, str]:
  """(reviews, metadata) gzipped file names of `dataset`."""
  check_choice("data.dataset", dataset, tuple(DATASETS))
  name = DATASETS[dataset]
  return f"reviews_{name}_5.json.gz", f"meta_{name}.json.gz"


def raw_files(data_config: ConfigDict, download: bool = True) -> list[str]:
  """[reviews, metadata] (.json.gz, else .json); downloads missing ones (or DataError)."""
  raw_dir = os.path.expanduser(data_config.raw_dir or os.path.join(cache_root(), "raw", "amazon"))
  base_url = (data_config.get("base_url", SNAP_URL) or SNAP_URL).rstrip("/")
  paths = [os.path.join(raw_dir, name) for name in raw_file_names(data_config.dataset)]
  paths = [p[:-len(".gz")] if not os.path.isfile(p) and os.path.isfile(p[:-len(".gz")]) else p
           for p in paths]
  missing = [(f"{base_url}/{os.path.basename(p)}", p) for p in paths if not os.path.isfile(p)]
  if missing and not download:
    raise DataError(f"amazon: {', '.join(p for _, p in missing)} not found")
  if missing:
    logging.info("Amazon raw files missing under %s; downloading %d file(s)", raw_dir, len(missing))
    download_lib.ensure_files(missing)
  return paths


@dataclasses.dataclass
class Reviews:
  """Reviews joined with categories, sorted by (user, time, file order): user [R] in [0, U),
  item [R] in [0, I), time [R] seconds, item_category [I] in [0, C), count [U], pos [R] rank
  within the user (0 = oldest). Ids rank the sorted strings (as DIN's remap):
  user_keys [U], item_keys [I], category_keys [C] hold the string of each id."""
  user: np.ndarray
  item: np.ndarray
  time: np.ndarray
  item_category: np.ndarray
  count: np.ndarray
  pos: np.ndarray
  num_users: int
  num_items: int
  num_categories: int
  user_keys: np.ndarray | None = None
  item_keys: np.ndarray | None = None
  category_keys: np.ndarray | None = None


def _dense_ranks(keys: list[str], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(rank [K] of each key among the used keys (`ids`) sorted, -1 if unused; those keys)."""
  names = np.array(keys, dtype=str)
  used = np.zeros(len(names), bool)
  used[ids] = True
  order = np.argsort(names, kind="stable")
  order = order[used[order]]
  ranks = np.full(len(names), -1, np.int64)
  ranks[order] = np.arange(len(order))
  return ranks, names[order]


def join_reviews(raw: amazon_raw.RawReviews, categories: list[str | None]) -> tuple[Reviews, int]:
  """Drops reviews of items without usable metadata; returns (Reviews, reviews dropped)."""
  has_meta = np.array([c is not None for c in categories], bool)
  keep = has_meta[raw.item] if len(raw.item) else np.zeros(0, bool)
  dropped = int((~keep).sum())
  kept = (lambda a: a) if not dropped else (lambda a: a[keep])  # noqa: E731 - no copy if all
  user_rank, user_keys = _dense_ranks(raw.user_keys, kept(raw.user))
  item_rank, item_keys = _dense_ranks(raw.item_keys, kept(raw.item))
  used_items = np.flatnonzero(item_rank >= 0)
  cat_names, cat_index = np.unique(np.array([categories[i] for i in used_items], dtype=str),
                                   return_inverse=True)
  item_category = np.zeros(len(item_keys), np.int64)
  item_category[item_rank[used_items]] = cat_index
  user, when = user_rank[kept(raw.user)], kept(raw.time)
  # (user, time) in one int64 (plausible times are < 2**32); a stable sort keeps the file
  # order of ties. One column at a time bounds the temporary memory.
  order = np.argsort(user << 32 | when, kind="stable")
  user = user[order]
  when = when[order]
  item = item_rank[kept(raw.item)][order]
  del order
  count = np.bincount(user, minlength=len(user_keys)).astype(np.int64)
  pos = np.arange(len(user), dtype=np.int64) - (np.cumsum(count) - count)[user]
  return Reviews(user, item, when, item_category, count, pos, len(user_keys),
                 len(item_keys), len(cat_names), user_keys, item_keys, cat_names), dropped


def uniform_negatives(rng: np.random.Generator, reviews: Reviews, rows: np.ndarray) -> np.ndarray:
  """A uniformly random item that the row's user never reviewed, per target row (DIN gen_neg)."""
  positive_keys = np.sort(reviews.user * reviews.num_items + reviews.item)
  positive_keys = positive_keys[np.flatnonzero(np.diff(positive_keys, prepend=-1))]  # unique
  if len(rows) and (np.bincount(positive_keys // reviews.num_items) >= reviews.num_items).any():
    raise DataError("amazon: a user reviewed every item, so no negative item exists")

  def reviewed(at: np.ndarray) -> np.ndarray:
    """The entries of `at` (indices into rows) whose negative the row's user reviewed."""
    out = [np.zeros(0, np.int64)]
    for lo in range(0, len(at), NEGATIVE_CHUNK):  # chunks bound the temporary memory
      a = at[lo:lo + NEGATIVE_CHUNK]
      keys = reviews.user[rows[a]] * reviews.num_items + negatives[a]
      found = np.minimum(np.searchsorted(positive_keys, keys), len(positive_keys) - 1)
      out.append(a[positive_keys[found] == keys])
    return np.concatenate(out)

  negatives = rng.integers(reviews.num_items, size=len(rows))
  redo = reviewed(np.arange(len(rows)))
  while len(redo):
    negatives[redo] = rng.integers(reviews.num_items, size=len(redo))
    redo = reviewed(redo)
  return negatives


def popularity_negatives(rng: np.random.Generator, reviews: Reviews,
                         rows: np.ndarray) -> np.ndarray:
  """The item of a uniformly random review row per target row, redrawn while it is the target
  (DIEN manual_join: popularity-weighted, possibly another item the user reviewed)."""
  if len(rows) and np.unique(reviews.item).size < 2:
    raise DataError("amazon: popularity negatives need at least two distinct items")
  targets = reviews.item[rows]
  negatives = reviews.item[rng.integers(len(reviews.item), size=len(rows))]
  redo = np.flatnonzero(negatives == targets)
  while len(redo):
    negatives[redo] = reviews.item[rng.integers(len(reviews.item), size=len(redo))]
    redo = redo[negatives[redo] == targets[redo]]
  return negatives


def validation_users(valid_rng: np.random.Generator, eligible: np.ndarray) -> np.ndarray:
  """[U] bool: a seeded random ceil(VALID_USER_SHARE x the eligible users) of them."""
  users = np.flatnonzero(eligible)
  return np.isin(np.arange(len(eligible)),
                 valid_rng.permutation(users)[:int(np.ceil(VALID_USER_SHARE * len(users)))])


def protocol_targets(protocol: str, reviews: Reviews, rng: np.random.Generator,
                     valid_rng: np.random.Generator) -> dict[str, np.ndarray]:
  """{split: sorted row indices of the target reviews} (docs/data.md; n = the user's count):
  din: test = review n-1, train = reviews 1..n-2 but valid = review n-2 of the validation
  users (`validation_users` of those with n >= 3); dien: review n-1 only, test users with
  probability 1/10 (split_by_user.py), validation users of the others, the rest train;
  mian: train = reviews 1..n-3, valid = review n-2, test = review n-1. `rng` is drawn from as
  in the references: the validation draw (`valid_rng`) changes neither test nor negatives."""
  pos, n = reviews.pos, reviews.count[reviews.user]
  test = last = (pos >= 1) & (pos == n - 1)
  if protocol == "din":
    to_valid = validation_users(valid_rng, reviews.count >= 3)[reviews.user]
    valid = (pos >= 1) & (pos == n - 2) & to_valid
    train = (pos >= 1) & (pos <= n - 2) & ~valid
  elif protocol == "dien":
    to_test = rng.integers(1, 11, size=reviews.num_users) == 2
    to_valid = validation_users(valid_rng, ~to_test & (reviews.count >= 2))
    test, valid = last & to_test[reviews.user], last & to_valid[reviews.user]
    train = last & ~test & ~valid
  else:  # mian
    train = (pos >= 1) & (pos <= n - 3)
    valid = (pos >= 1) & (pos == n - 2)
  return {s: np.flatnonzero(m) for s, m in zip(schema_lib.SPLITS, (train, valid, test))}


def _ids(x: np.ndarray) -> np.ndarray:
  return (x + schema_lib.NUM_RESERVED_IDS).astype(np.int32)


def build_examples(reviews: Reviews, rows: np.ndarray, negatives: np.ndarray, max_seq_len: int,
                   years: np.ndarray, behaviors: tuple[np.ndarray, np.ndarray]
                   ) -> dict[str, np.ndarray]:
  """Columns of 2M examples of M target rows: 2k the positive (the reviewed item, label 1),
  2k+1 the negative (negatives[rows[k]], label 0), with the same other features; behaviours:
  the user's T latest reviews before the row, newest first, padded. behaviors: [R + 1] int32
  item and category ids of each review row, PAD_ID at row R."""
  pos = reviews.pos[rows]
  t = np.arange(max_seq_len)
  index = np.where(t < np.minimum(pos, max_seq_len)[:, None], (rows - 1)[:, None] - t,
                   len(reviews.item))  # [M, T] review rows, R: padding
  # In range: clip only skips the bounds check.
  hist_item, hist_cat = (np.repeat(ids.take(index, mode="clip"), 2, axis=0) for ids in behaviors)
  both = lambda x: np.repeat(x, 2)  # noqa: E731
  cand = np.stack([reviews.item[rows], negatives[rows]], axis=1).reshape(-1)  # interleaved
  seconds = reviews.time[rows]
  gap_days = (seconds - reviews.time[np.maximum(rows - 1, 0)]) // SECONDS_PER_DAY
  gap = np.where(pos >= 1, np.searchsorted(GAP_EDGES_DAYS, gap_days, side="right"), NO_PREVIOUS_GAP)
  return {
      "item.item_id": _ids(cand),
      "item.category": _ids(reviews.item_category[cand]),
      "hist.item_id": hist_item,
      "hist.category": hist_cat,
      "hist_len": both(np.minimum(pos, max_seq_len)).astype(np.int32),
      "user.user_id": _ids(both(reviews.user[rows])),
      "user.activity": _ids(both(np.searchsorted(ACTIVITY_EDGES, pos, side="right"))),
      "context.year": _ids(both(np.searchsorted(years, encoding.calendar("year", seconds)))),
      "context.month": _ids(both(encoding.calendar("month", seconds) - 1)),  # 0..11, UTC
      "context.weekday": _ids(both(encoding.calendar("weekday", seconds))),  # Monday = 0
      "context.gap": _ids(both(gap)),
      "label": np.tile(np.array([1.0, 0.0], np.float32), len(rows)),
      "group_id": both(reviews.user[rows]).astype(np.int64),
  }


def example_blocks(reviews: Reviews, rows: np.ndarray, negatives: np.ndarray, max_seq_len: int,
                   years: np.ndarray, extra_columns: ExtraColumns | None,
                   split: str) -> Iterator[dict[str, np.ndarray]]:
  """`build_examples` of EXAMPLE_BLOCK `rows` at a time, `extra_columns` of EXTRA_BLOCK at once."""
  progress = amazon_raw.Progress(f"amazon: building {split} examples", 2 * len(rows), "examples")
  pad = np.array([schema_lib.PAD_ID], np.int32)  # row R: the padding of the behaviours
  behaviors = tuple(np.concatenate([_ids(ids), pad])
                    for ids in (reviews.item, reviews.item_category[reviews.item]))
  group_size = max(EXTRA_BLOCK, EXAMPLE_BLOCK)
  for group_lo in range(0, len(rows), group_size):
    group = rows[group_lo:group_lo + group_size]
    extra = extra_columns(reviews, group, negatives[group]) if extra_columns else {}
    for lo in range(0, len(group), EXAMPLE_BLOCK):
      block = group[lo:lo + EXAMPLE_BLOCK]
      columns = build_examples(reviews, block, negatives, max_seq_len, years, behaviors)
      yield columns | {k: v[2 * lo:2 * (lo + len(block))] for k, v in extra.items()}
      done = 2 * (group_lo + lo + len(block))
      progress.update(done, done)
  progress.done(2 * len(rows))


def vocabularies(reviews: Reviews, years: np.ndarray, protocol: str) -> dict[str, Any]:
  """The keyword arguments of `vocab.write_vocabularies`."""
  category_rule = ("last element of the first category path" if protocol == "dien"
                   else "last element of the last category path")
  return {
      "vocabularies": {
          "item.item_id": reviews.item_keys.tolist(),
          "item.category": reviews.category_keys.tolist(),
          "user.user_id": reviews.user_keys.tolist(),
          "context.year": [str(y) for y in years],
          "context.month": [str(m) for m in range(1, 13)],
          "context.weekday": [str(d) for d in range(7)],
      },
      "encoders": {
          "item.category": {"kind": "rule", "of": "the asin's metadata 'categories'",
                            "rule": category_rule},
          "user.activity": {"kind": "buckets", "edges": ACTIVITY_EDGES.tolist(),
                            "first_id": schema_lib.NUM_RESERVED_IDS,
                            "of": "the number of the reviewer's earlier reviews"},
          "context.gap": {"kind": "buckets", "edges": GAP_EDGES_DAYS.tolist(),
                          "missing_bucket": NO_PREVIOUS_GAP,
                          "first_id": schema_lib.NUM_RESERVED_IDS,
                          "of": "whole days (floor) since the reviewer's previous review; "
                                "missing for the first review"},
          **{f"context.{unit}": {"kind": "calendar", "unit": unit,
                                 "of": "unixReviewTime (seconds)"}
             for unit in ("year", "month", "weekday")},
      },
      "lookups": {"item.item_id": {
          "keys": reviews.item_keys.tolist(),
          "item.category": reviews.category_keys[reviews.item_category].tolist()}},
      "note": ("amazon: user_id, item_id and category map the reviewerID, asin and category "
               "strings of all kept reviews (every split), sorted; lookup.item.item_id gives "
               "each asin's category"),
  }


def predict_reader(data_config: ConfigDict) -> ConfigDict:
  """The columns of records to score (`mian_jax.predict`), as in the reviews; label 1: bought."""
  del data_config  # the same columns for every dataset and protocol
  return records_lib.reader_config(user_id="reviewerID", item_id="asin", timestamp="unixReviewTime")


def behaviors_in_order(users: np.ndarray, seconds: np.ndarray, is_review: np.ndarray,
                       max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's behaviours as `build_examples` builds them: the user's reviews (is_review [N])
  before the row in (time, row) order; returns (rows [N, T] newest first, -1 = pad; counts [N])."""
  rank = np.empty(len(users), np.int64)  # the row's place in (time, row) order: no ties
  rank[np.lexsort((np.arange(len(users)), seconds))] = np.arange(len(users))
  return interaction_log.history_from_log(pd.factorize(pd.Series(users), sort=True)[0], rank,
                                          is_review, max_seq_len)


def encode_records(records: records_lib.Records, directory: str,
                   data_config: ConfigDict) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Review records -> (split columns, unseen values per field); label 1 (or none): a review."""
  log = records.log
  categories = vocab.load_lookups(directory)["item.item_id"]
  asins, seconds = log["item.asin"].to_numpy(object), log["timestamp"].to_numpy(np.float64)
  is_review = log["label"].to_numpy() == 1 if records.labelled else np.ones(len(log), bool)
  indices, counts = behaviors_in_order(log["user"].to_numpy(object), seconds, is_review,
                                       data_config.max_seq_len)
  newest = indices[:, 0]
  raw = {
      "item.item_id": asins,
      "item.category": categories.get("item.category", asins),
      "user.user_id": log["user"].to_numpy(object),
      "user.activity": counts,
      "context.year": seconds, "context.month": seconds, "context.weekday": seconds,
      "context.gap": np.where(newest >= 0, np.floor_divide(
          seconds - seconds[np.maximum(newest, 0)], SECONDS_PER_DAY), np.nan),
  }
  return records_lib.encode(records, directory, raw, ("item_id", "category"), indices,
                            np.minimum(counts, data_config.max_seq_len))


def _first_skipped_text(first_skipped: Mapping[str, str]) -> str:
  text = "; ".join(f"{k} at {v}" for k, v in first_skipped.items())
  return f"; first skipped: {text}" if text else ""


def _check_bad_rows(stats: dict, max_ratio: float, paths: tuple[str, str]) -> None:
  r, m = stats["reviews"], stats["metadata"]
  review_bad = r["malformed_lines"] + r["missing_fields"] + r["bad_time"] + r["without_metadata"]
  review_lines = r["lines"] - r["blank_lines"]
  meta_lines = m["lines"] - m["blank_lines"] - m["skipped_unreviewed"]
  stats["bad_row_ratio"] = {
      "reviews": review_bad / max(review_lines, 1),
      "metadata": (m["malformed_lines"] + m["missing_fields"]) / max(meta_lines, 1)}
  first = _first_skipped_text(stats["first_skipped"]["reviews"])
  if review_lines == 0 or r["parsed"] == 0:
    raise DataError(f"amazon: no usable review lines in {paths[0]} ({r}){first}")
  if r["kept"] == 0:
    raise DataError(f"amazon: no review of {paths[0]} has an item with categories in "
                    f"{paths[1]} (reviews {r}, metadata {m})")
  for (what, ratio), path in zip(stats["bad_row_ratio"].items(), paths):
    if ratio > max_ratio:
      raise DataError(f"amazon: {ratio:.2%} of the {what} lines of {path} are bad, above "
                      f"data.max_bad_row_ratio={max_ratio:g} (reviews {r}, metadata {m})"
                      + (first if what == "reviews" else ""))


def load_reviews(reviews_path: str, meta_path: str, protocol: str, max_bad_row_ratio: float,
                 drop_duplicates: bool = True) -> tuple[Reviews, dict]:
  """(Reviews, stats) of the raw files, or DataError; drop_duplicates: `drop_duplicate_reviews`."""
  raw = amazon_raw.read_reviews(reviews_path)
  logging.info("amazon: parsed %s: %s", reviews_path, raw.counts)
  duplicates = 0
  if drop_duplicates:
    with amazon_raw.stage("dropping repeated reviews"):
      raw, duplicates = amazon_raw.drop_duplicate_reviews(raw)
  raw.line = None  # only the messages above need line numbers
  wanted = {asin: i for i, asin in enumerate(raw.item_keys)}
  categories, meta_counts = amazon_raw.read_metadata(meta_path, wanted, protocol)
  logging.info("amazon: parsed %s: %s", meta_path, meta_counts)
  with amazon_raw.stage("joining reviews with categories"):
    reviews, dropped = join_reviews(raw, categories)
  stats = {"reviews": dict(raw.counts, duplicate_reviews=duplicates, without_metadata=dropped,
                           kept=len(reviews.item)),
           "metadata": meta_counts, "first_skipped": {"reviews": raw.first_skipped}}
  _check_bad_rows(stats, max_bad_row_ratio, (reviews_path, meta_path))
  r = stats["reviews"]
  if r["bad_time"] or duplicates:
    logging.warning("amazon: %s: skipped %d review(s) with an implausible unixReviewTime and %d "
                    "repeated (reviewer, asin) review(s) (the earliest kept)%s", reviews_path,
                    r["bad_time"], duplicates, _first_skipped_text(raw.first_skipped))
  return reviews, stats


# f(reviews, rows [M], negatives [M]) -> {"extra.<name>": [2M] float32}: side columns of the
# examples of target rows `rows`, in build_examples' order (2k positive, 2k+1 its negative).
ExtraColumns = Callable[[Reviews, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def prepare_from_files(data_config: ConfigDict, reviews_path: str, meta_path: str,
                       directory: str, extra_columns: ExtraColumns | None = None) -> dict:
  """Prepares `directory` (`extra_columns` in every split); returns what stats.json holds."""
  protocol = data_config.protocol
  check_choice("data.protocol", protocol, PROTOCOLS)
  started = time.time()
  reviews, stats = load_reviews(reviews_path, meta_path, protocol, data_config.max_bad_row_ratio,
                                data_config.get("drop_duplicate_reviews", True))
  seed = data_config.get("seed", 0)
  rng = np.random.default_rng(seed)
  with amazon_raw.stage("drawing targets and negatives"):
    targets = protocol_targets(protocol, reviews, rng, np.random.default_rng([seed, VALID_STREAM]))
    # One negative per review row, as the references draw them.
    negatives = (popularity_negatives if protocol == "dien" else uniform_negatives)(
        rng, reviews, np.arange(len(reviews.item)))
  years = np.unique(encoding.calendar("year", reviews.time))
  sizes = {s: 2 * len(targets[s]) for s in schema_lib.SPLITS}
  for split, size in sizes.items():
    if size == 0:
      raise DataError(f"amazon: protocol {protocol!r} produced no {split} examples "
                      f"({stats['reviews']['kept']} reviews, {reviews.num_users} users)")
  stats.update({
      "source": "amazon", "dataset": data_config.dataset, "protocol": protocol,
      "num_users": reviews.num_users, "num_items": reviews.num_items,
      "num_categories": reviews.num_categories, "num_reviews": int(len(reviews.item)),
      "num_samples": sizes,
      "valid_is_test": False,  # no protocol copies test into valid (config_checks reads it)
      "years": [int(y) for y in years],
      "positive_rate": dict.fromkeys(schema_lib.SPLITS, 0.5),  # one negative per positive
      "raw_files": [reviews_path, meta_path],
  })
  with amazon_raw.stage("building and writing the splits, vocab/ and the checksum"):
    splits = {split: example_blocks(reviews, targets[split], negatives,
                                    data_config.max_seq_len, years, extra_columns, split)
              for split in schema_lib.SPLITS}
    first = next(splits["train"])  # its columns name the extra columns of the schema
    splits["train"] = itertools.chain([first], splits["train"])
    extra_names = tuple(sorted(k.split(".", 1)[1] for k in first if k.startswith("extra.")))
    cat = lambda name, size: schema_lib.Field(  # noqa: E731
        name, "categorical", size + schema_lib.NUM_RESERVED_IDS)
    features = schema_lib.FeatureSpec(
        item_fields=(cat("item_id", reviews.num_items), cat("category", reviews.num_categories)),
        behavior_fields=("item_id", "category"), max_seq_len=data_config.max_seq_len,
        user_fields=(cat("user_id", reviews.num_users), cat("activity", len(ACTIVITY_EDGES) + 1)),
        context_fields=(cat("year", len(years)), cat("month", 12), cat("weekday", 7),
                        cat("gap", NO_PREVIOUS_GAP + 1)))
    schema = schema_lib.Schema(
        features, tuple((s, sizes[s]) for s in schema_lib.SPLITS), extra_names,
        f"amazon({data_config.dataset}, protocol={protocol}, seed={seed})")
    write_vocabularies = functools.partial(vocab.write_vocabularies,
                                           **vocabularies(reviews, years, protocol))
    stats["checksum"] = schema_lib.write_prepared(directory, schema, splits, stats,
                                                  write_vocabularies)
  logging.info("amazon: prepared %s in %.1fs: %d users, %d items, %d categories, samples %s, "
               "bad rows %s, repeated reviews dropped %d", directory, time.time() - started,
               reviews.num_users, reviews.num_items, reviews.num_categories, sizes,
               stats["bad_row_ratio"], stats["reviews"]["duplicate_reviews"])
  return stats


def prepare(data_config: ConfigDict, directory: str) -> None:
  prepare_from_files(data_config, *raw_files(data_config), directory)
