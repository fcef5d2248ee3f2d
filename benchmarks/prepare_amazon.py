"""Benchmark of the Amazon preparation on a Books-scale synthetic raw file pair.

Writes reviews_Books_5.json.gz and meta_Books.json.gz with the real files' schema and roughly
the real Books 5-core sizes at --scale=1 (~603k users, ~368k reviewed items, 1,600 categories,
~8.9M reviews; the metadata also holds ~5x as many unreviewed items, as meta_Books does), then
prepares them in a child process and reports its wall time and peak RSS as a table and one
JSON line.

  python -m benchmarks.prepare_amazon --dir=/tmp/amazon_bench --scale=0.05
  python -m benchmarks.prepare_amazon --dir=/tmp/amazon_bench --scale=1 --protocol=mian

Target at --scale=1: <= 5 min and <= 8 GB peak RSS on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks import common

BOOKS_USERS = 603_668
BOOKS_ITEMS = 367_982
BOOKS_CATEGORIES = 1_600
MEAN_REVIEWS_PER_USER = 14.7  # 8.9M reviews / 603,668 users
CHUNK = 500_000


def _time_range() -> tuple[int, int]:
  start = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC).timestamp()
  end = datetime.datetime(2014, 7, 23, tzinfo=datetime.UTC).timestamp()
  return int(start) // 86400, int(end) // 86400


def generate(directory: str, scale: float, text_chars: int = 5, seed: int = 0) -> dict:
  """Writes the raw file pair; returns their sizes and counts.

  text_chars: length of each reviewText (the real Books texts average several hundred
  characters; short texts make the files small but underestimate the JSON parsing time).
  """
  rng = np.random.default_rng(seed)
  num_users = max(10, int(BOOKS_USERS * scale))
  num_items = max(10, int(BOOKS_ITEMS * scale))
  num_categories = min(BOOKS_CATEGORIES, max(5, int(BOOKS_CATEGORIES * scale ** 0.5)))
  # 5-core: at least 5 reviews per user, geometric tail with the real mean.
  per_user = 5 + rng.geometric(1.0 / (MEAN_REVIEWS_PER_USER - 4.0), size=num_users) - 1
  num_reviews = int(per_user.sum())
  popularity = 1.0 / (np.arange(num_items) + 20.0) ** 0.9
  popularity /= popularity.sum()
  # Unique, unsorted-looking names (the ids are ranks of the sorted names).
  user_names = [f"A{x:013X}" for x in (np.arange(num_users) * 2654435761 % (1 << 48)).tolist()]
  item_names = [f"{x:010d}" for x in (np.arange(num_items * 6) * 1000003 % 10 ** 10).tolist()]
  reviewed_items = item_names[:num_items]
  text = ("Fine. " * (text_chars // 6 + 1))[:text_chars]
  first_day, last_day = _time_range()
  os.makedirs(directory, exist_ok=True)
  reviews_path = os.path.join(directory, "reviews_Books_5.json.gz")
  users = np.repeat(np.arange(num_users), per_user)
  rng.shuffle(users)  # the real file is ordered by item; order must not matter
  with gzip.open(reviews_path, "wt", compresslevel=1, encoding="utf-8") as f:
    for lo in range(0, num_reviews, CHUNK):
      u = users[lo:lo + CHUNK]
      items = rng.choice(num_items, size=len(u), p=popularity)
      days = rng.integers(first_day, last_day, size=len(u))
      stars = rng.integers(1, 6, size=len(u))
      f.write("".join(
          f'{{"reviewerID": "{user_names[a]}", "asin": "{reviewed_items[b]}", '
          f'"reviewerName": "x", "helpful": [0, 0], "reviewText": "{text}", "overall": {c}.0, '
          f'"summary": "ok", "unixReviewTime": {d * 86400}, "reviewTime": "01 1, 2014"}}\n'
          for a, b, c, d in zip(u.tolist(), items.tolist(), stars.tolist(), days.tolist())))
  meta_path = os.path.join(directory, "meta_Books.json.gz")
  category = rng.integers(num_categories, size=len(item_names))
  order = rng.permutation(len(item_names))
  with gzip.open(meta_path, "wt", compresslevel=1, encoding="utf-8") as f:
    for lo in range(0, len(order), CHUNK):
      f.write("".join(
          repr({"asin": item_names[i], "title": "A 'quoted' title",
                "salesRank": {"Books": int(i)},
                "categories": [["Books", f"Genre {category[i] // 40}",
                                f"Category {category[i]}"]]}) + "\n"
          for i in order[lo:lo + CHUNK].tolist()))
  return {"scale": scale, "text_chars": text_chars, "users": num_users, "items": num_items,
          "categories": num_categories, "reviews": num_reviews,
          "reviews_gz_mb": round(os.path.getsize(reviews_path) / 2 ** 20, 1),
          "meta_gz_mb": round(os.path.getsize(meta_path) / 2 ** 20, 1),
          "meta_lines": len(item_names)}


def prepare_child(directory: str, protocol: str) -> dict:
  """Runs the preparation in this process; returns wall time and peak RSS."""
  from absl import logging  # noqa: PLC0415 - the parent process needs none of these

  from configs import books  # noqa: PLC0415
  from mian_jax.data import amazon  # noqa: PLC0415
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  config = books.get_config(f"protocol={protocol}").data
  config.raw_dir = directory
  out = os.path.join(directory, f"prepared-{protocol}")
  shutil.rmtree(out, ignore_errors=True)
  started = time.time()
  amazon.prepare(config, out)
  wall = time.time() - started
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"protocol": protocol, "wall_s": round(wall, 1),
          "peak_rss_gb": round(peak_kb / 2 ** 20, 2),
          "num_users": stats["num_users"], "num_items": stats["num_items"],
          "num_categories": stats["num_categories"], "num_reviews": stats["num_reviews"],
          "num_samples": stats["num_samples"],
          "prepared_gb": round(sum(os.path.getsize(os.path.join(d, x))
                                   for d, _, xs in os.walk(out) for x in xs) / 2 ** 30, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", required=True, help="where the raw files and output go")
  parser.add_argument("--scale", type=float, default=1.0, help="1 = Books size")
  parser.add_argument("--text_chars", type=int, default=5, help="reviewText length")
  parser.add_argument("--protocol", default="mian", choices=("mian", "din", "dien"))
  parser.add_argument("--skip_generate", action="store_true", help="reuse the raw files")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(prepare_child(args.dir, args.protocol)), flush=True)
    return
  generated = {}
  if not args.skip_generate:
    started = time.time()
    generated = generate(args.dir, args.scale, args.text_chars)
    generated["generate_s"] = round(time.time() - started, 1)
    print("generated " + json.dumps(generated), flush=True)
  child = subprocess.run([sys.executable, "-m", "benchmarks.prepare_amazon",
                          "--dir", os.path.abspath(args.dir), "--protocol", args.protocol,
                          "--child"], cwd=common.ROOT, stdout=subprocess.PIPE, text=True,
                         check=True)
  lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
  kept = ("reviews_gz_mb", "meta_gz_mb", "generate_s", "text_chars")
  result = dict(json.loads(lines[-1][len("RESULT "):]), scale=args.scale,
                **{k: v for k, v in generated.items() if k in kept})
  print(f"{'metric':<16} value")
  for key, value in result.items():
    print(f"{key:<16} {value}")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
