"""MIAN on the Amazon-like benchmark: generated shopping histories in the raw Amazon 2014 format,
prepared by the real Amazon pipeline, with the true purchase probabilities known, so every
evaluation reports an oracle AUC (docs/data.md, "Amazon-like benchmark").

  python -m mian_jax.prepare --config=configs/amazon_like.py
  python -m mian_jax.main --config=configs/amazon_like.py --workdir=runs/al
  python -m mian_jax.main --config=configs/amazon_like.py:size=small,model=din --workdir=runs/s

Arguments: model (default "mian"), protocol ("mian" | "din" | "dien"), size ("default": 20,000
users, 4,000 items, ~266k reviews; "small": 3,000 users, seconds to prepare; "books": the size
of Amazon Books, ~8.9M reviews, minutes to generate). The raw files are generated into
--config.data.raw_dir (default: <cache>/raw/amazon_like-<hash of data.generator>) if missing.
"""

import ml_collections

from mian_jax import config_defaults

SIZES = ("default", "small", "books")


def get_generator(size: str = "default") -> ml_collections.ConfigDict:
  """The settings of the generative story (mian_jax/data/amazon_like.py) at `size`."""
  if size not in SIZES:
    raise ValueError(f"config argument size={size!r}: expected one of {SIZES}")
  g = ml_collections.ConfigDict()
  g.name = "AmazonLike"  # file names reviews_<name>_5.json.gz, meta_<name>.json.gz; root category
  g.seed = 0  # everything generated is drawn from this seed
  # Catalogue.
  g.num_users = 20_000  # users (reviewers)
  g.num_items = 4_000  # items, reviewed or not
  g.num_categories = 40  # leaf categories
  g.min_items_per_category = 5  # every category has at least this many items
  g.category_size_concentration = 1.0  # Dirichlet concentration of category sizes (low: uneven)
  g.popularity_sigma = 1.5  # std of log item popularity within its category (log-normal)
  # Taste.
  g.num_favourite_categories = 5  # categories a user's taste is spread over (drawn by size)
  g.taste_concentration = 0.5  # Dirichlet concentration of the weights over them (low: 1-2 lead)
  g.taste_floor = 0.05  # share of taste spread uniformly over all categories (exploration)
  g.taste_drift_days = 1000.0  # time scale of the move from the start to the end taste weights
  # Activity and time.
  g.min_reviews_per_user = 5  # 5-core: every user has at least this many reviews
  g.mean_reviews_per_user = 13.3  # mean reviews per user (Books 5-core: 14.7)
  g.activity_sigma = 1.0  # std of the log-normal number of reviews beyond the minimum
  g.max_reviews_per_user = 400  # cap on reviews per user (must stay below num_items)
  g.first_date = "2008-01-01"  # no review before this day (UTC)
  g.last_date = "2014-07-23"  # nor after this one (the end of the 2014 crawl)
  g.growth_per_year = 0.5  # users start later more often: density ~ exp(growth * years)
  g.gap_median_days = 30.0  # median of the users' typical gap between two reviews
  g.gap_user_sigma = 0.8  # std of the log typical gap across users
  g.gap_sigma = 1.0  # std of the log gap around the user's typical gap (gaps >= 1 day)
  # Seasons.
  g.gift_category_share = 0.15  # share of categories that peak in Nov-Dec (gifts)
  g.summer_category_share = 0.15  # share of categories that peak in July (low in January)
  g.gift_amplitude = 1.5  # log factor of gift categories in December (half in November)
  g.summer_amplitude = 0.8  # log factor of summer categories in July (minus in January)
  g.season_noise = 0.1  # std of the log monthly factor of every category
  # Sequence.
  g.num_complement_categories = 3  # complementary categories of each category
  g.repeat_share = 0.5  # share of the category transition that stays in the same category
  g.transition_weight = 0.5  # lambda: weight of the transition from the last purchase's category
  g.num_complement_items = 3  # K: complementary items of each item (a camera's lens)
  g.complement_cross_share = 0.7  # share of complements from a complementary category
  g.complement_weight = 0.25  # h_0: purchase mass on the complements of the last purchase
  g.complement_decay = 0.5  # h_k = h_0 * decay^k for the purchase k steps before the last
  g.complement_window = 4  # W: purchases whose complements are boosted
  g.rating_probs = (0.06, 0.05, 0.09, 0.2, 0.6)  # "overall" 1..5 stars (unused by the pipeline)
  if size == "small":
    g.num_users = 3_000
    g.num_items = 800
    g.num_categories = 12
    g.max_reviews_per_user = 200
  elif size == "books":  # Amazon Books 5-core (DIEN's counts); ~8.9M reviews
    g.num_users = 603_668
    g.num_items = 367_982
    g.num_categories = 1_600
    g.mean_reviews_per_user = 14.7
    g.max_reviews_per_user = 2_000
  return g


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_defaults.parse_arg(arg, {"protocol": "mian", "size": "default"})
  config = config_defaults.get_amazon_config("books", args)
  config.data.source = "amazon_like"
  config.data.dataset = "amazon_like"  # recorded in stats.json and the schema's source
  del config.data.base_url  # nothing is downloaded
  config.data.raw_dir = ""  # "" = <cache>/raw/amazon_like-<hash of generator>; generated if missing
  config.data.generator = get_generator(args["size"])

  # One epoch (3,236 steps at the default size), as for the real Amazon data; every run reports
  # its best validation step (eval.report_step), so a longer budget can only help a model that
  # is still improving (docs/experiments.md).
  config.train.num_epochs = 1.0
  return config
