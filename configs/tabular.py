"""MIAN on your own logs, CSV or Parquet (fields, label and split: docs/data.md).

  python -m mian_jax.prepare --config=configs/tabular.py \
      --config.data.tabular.path=/data/my_logs.parquet
  python -m mian_jax.main --config=configs/tabular.py --config.data.tabular.path=logs.csv \
      --workdir=runs/mine

The worked example below describes an impression log with the columns

  user_id, ts (Unix seconds), clicked (0/1),
  item_id, category, price,               -> item fields (price numeric)
  age_group, gender, city,                -> user-specific fields
  hour, device                            -> context fields

and builds each example's behaviours from the same user's earlier clicks (item_id, category).
Override any key on the command line, e.g. --config.data.tabular.user_fields=age_group,gender.
"""

import ml_collections

from mian_jax import config_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = config_defaults.get_config_from_args(config_defaults.parse_arg(arg, {}))

  config.data.source = "tabular"
  config.data.max_bad_row_ratio = 0.001  # malformed rows tolerated per file, else fail
  t = config.data.tabular = ml_collections.ConfigDict()
  t.path = ""  # one CSV/Parquet file, split by time (valid_fraction, test_fraction)
  t.train_path = ""  # ... or three pre-split files
  t.valid_path = ""
  t.test_path = ""
  t.format = "auto"  # "auto" (by extension: .parquet/.pq, else CSV) | "csv" | "parquet"
  t.csv_sep = ","  # CSV field separator
  t.encoding = "utf-8"  # CSV text encoding
  t.valid_fraction = 0.1  # with path: the 10% of rows (by timestamp) before the test period
  t.test_fraction = 0.1  # with path: the last 10% of rows by timestamp
  t.label = "clicked"  # 0/1 (or true/false) column
  t.user_id = "user_id"  # user column (group_id for gAUC)
  t.timestamp = "ts"  # Unix seconds, or a date-time string / Parquet timestamp
  # "name:kind,..." with kind categorical (default), numeric or hash(N) (no vocabulary: ids
  # 2 + stable hash mod N, docs/data.md "Hashed fields"); the first item field = item id.
  t.item_fields = "item_id:categorical,category:categorical,price:numeric"
  t.user_fields = "age_group:categorical,gender:categorical,city:categorical"
  t.context_fields = "hour:categorical,device:categorical"
  t.category_field = "category"  # item field counted as num_categories in stats.json ("" = none)
  t.behavior_fields = "item_id,category"  # categorical item fields forming the behaviours
  t.behavior_source = "log"  # "log": built from the user's earlier rows | "list": list columns
  t.behavior_rows = "clicks"  # with "log": which earlier rows are behaviours: "clicks" | "all"
  t.behavior_columns = ""  # with "list": "item_id:hist_item_ids,category:hist_categories"
  t.list_sep = "|"  # with "list" in CSV: separator inside a list cell ("3|17|5", oldest first)

  config.train.num_epochs = 1.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 1000
  config.checkpoint.every_steps = 1000
  return config
