"""Defaults shared by every data set's config (values of §4.3 where the paper gives them,
docs/model.md for the rest), and the config arguments; README.md, "Configuration"."""

from __future__ import annotations

import ml_collections

# config argument `reading`: "default" | "paper_literal" (every key of PAPER_LITERAL set).
READINGS = ("default", "paper_literal")
# Config path -> the paper's literal value, for each default that departs from the text
# (docs/model.md, "Departures from the text", one row each).
PAPER_LITERAL = {
    "model.interaction_values": "concat",  # eqs. 6, 10, 12 pool [e_i; x] only
    "model.gim_behavior": "concat",  # eq. 14 with §3.2.1's e_b = [e_b^1; ...; e_b^T]
    "model.position_embedding": "none",  # eqs. 3-4: the Transformer's input is e_b itself
    "model.ibim_score_weights": "per_position",  # eq. 8 writes W_t and b_t
    "model.dense_init": "truncated_normal",  # §4.3: all parameters, std 0.02
    "model.numeric_embedding": "pad",  # eq. 2: a numeric field's embedding is x itself
    "train.l2_scope": "all_weights",  # §4.3: l2 regularisation of the parameters
}
# What the Amazon configs (large vocabularies) depart in besides; docs/model.md, below the table.
AMAZON_LITERAL = {
    "train.optimizer": "adam",  # §4.3: Adam, every embedding row moved at every step
}


def get_base_config(reading: str = "default") -> ml_collections.ConfigDict:
  if reading not in READINGS:
    raise ValueError(f"config argument reading={reading!r}: expected one of {READINGS}")
  config = ml_collections.ConfigDict(
      {group: {} for group in ("data", "model", "train", "eval", "checkpoint", "sharding")})
  config.data.source = "synthetic"  # a source listed in mian_jax/data/__init__.py, or "prepared"
  config.data.prepared_dir = ""  # "" = a cache directory keyed by the data settings
  config.data.max_seq_len = 30  # T, behaviours per example (§4.3)

  config.model.name = "mian"  # a key of mian_jax.models.MODELS
  config.model.embed_dim = 16  # D, width of one field's embedding (not given in the paper)
  config.model.num_heads = 8  # Transformer heads (§4.3)
  config.model.ffn_dim_multiplier = 4  # FFN hidden width = this x model width (eq. 5)
  config.model.mlp_dims = (32, 8)  # DNN prediction module (§4.3, eq. 16)
  config.model.dropout_rate = 0.2  # §4.3
  config.model.dropout_rng = "hash"  # dropout bits: "hash" (fast) | "threefry" (= nn.Dropout)
  config.model.init_std = 0.02  # truncated-normal init std of embeddings (§4.3)
  config.model.dense_init = "lecun_normal"  # dense kernels: "lecun_normal" | "truncated_normal"
  config.model.transformer = "pre_ln"  # "pre_ln" | "post_ln" | "none" (Table 4)
  config.model.position_embedding = "learned"  # "learned" (by recency) | "none"
  config.model.use_ibim = True  # Table 3 ablations: item-behaviours module
  config.model.use_iuim = True  # item-user module
  config.model.use_icim = True  # item-context module
  config.model.use_gim = True  # global module; off = plain concatenation
  config.model.ibim_score_weights = "shared"  # eq. 8 W_t: "shared" | "per_position"
  # eq. 8 score: "additive" | "bilinear" (+ e_i^T M h_t) | "din" (+ DIN's activation unit)
  config.model.ibim_score = "additive"
  # Values of IBIM/IUIM/ICIM: "concat_product" (+ candidate * other) | "concat" (eqs. 6, 10, 12)
  config.model.interaction_values = "concat_product"
  config.model.field_score_weights = "per_field"  # eqs. 10/13 W^j: "per_field" | "shared"
  config.model.score_activation = "tanh"  # eqs. 8/10/13/15 score: "tanh" | "none"
  config.model.numeric_embedding = "linear"  # eq. 2 numeric x: "linear" (x*v) | "pad"
  config.model.gim_combine = "project_sum"  # eq. 15: "project_sum" | "weighted_concat"
  config.model.gim_dim = 64  # common width of GIM's parts with "project_sum"
  config.model.gim_behavior = "mean"  # e_b in eq. 14: "mean" over valid slots | "concat" (eq. 14)
  # Slots as MIAN sees them: "newest_first" (slot = recency) | "oldest_first" (for comparison)
  config.model.history_layout = "newest_first"
  # Baselines (docs/baselines.md); the keys above that a baseline's fields name apply to it too.
  config.model.sequence_pooling = "mean"  # behaviours -> one field (non-DIN/DIEN): "mean" | "sum"
  config.model.cross_layers = 3  # dcn: cross layers (eq. 3)
  config.model.cin_layer_sizes = (100, 100, 100)  # xdeepfm: feature maps per CIN layer (eq. 6)
  config.model.attention_mlp_dims = (36,)  # din (and mian's ibim_score="din"): activation unit
  config.model.use_dice = False  # din/dien MLP activation: Dice (True) or PReLU (False)
  # din/dien MLP inputs: "reference" (+ the candidate products of the authors' code) | "paper"
  config.model.baseline_inputs = "reference"
  # din weights: "scaled_softmax" (authors' code) | "softmax" | "none" (the paper), masked
  config.model.din_attention_norm = "scaled_softmax"
  config.model.gru_dim = 32  # dien: hidden width of both GRUs
  config.model.use_aux_loss = True  # dien: auxiliary loss of the interest extractor (eq. 3)
  config.model.aux_loss_weight = 1.0  # dien: alpha, the auxiliary loss weight (eq. 4)
  config.model.aux_mlp_dims = (100, 50)  # dien: auxiliary network hidden dims (authors' code)

  config.train.batch_size = 128  # global batch, split over devices (§4.3)
  config.train.learning_rate = 1e-3  # Adam (§4.3)
  # "adam" | "lazy_adam" (leaves embedding rows a batch did not use alone; docs/performance.md)
  config.train.optimizer = "adam"
  config.train.adam_b1 = 0.9  # §4.3
  config.train.adam_b2 = 0.999  # §4.3
  config.train.adam_eps = 1e-8  # optax default
  config.train.warmup_steps = 0  # learning rate rises linearly over these steps (0: none)
  config.train.grad_clip_norm = 0.0  # clip the gradient's global norm to this (0: no clipping)
  config.train.l2_weight = 1e-3  # §4.3
  config.train.l2_scope = "batch_embeddings"  # "batch_embeddings" | "all_weights" | "none"
  config.train.max_bce = 100.0  # a logged cross-entropy above this stops the run as diverged
  config.train.num_epochs = 1.0  # used when num_train_steps == -1
  config.train.num_train_steps = -1  # a step cap; -1 = num_epochs of the training split
  config.train.seed = 0  # parameters, data order and dropout
  config.train.log_every_steps = 100  # progress line and train metrics
  config.train.eval_every_steps = 1000  # validation during training (0: use eval_every_epochs)
  config.train.eval_every_epochs = 0.0  # or every this fraction of an epoch (0: use the steps)
  config.train.early_stopping_patience = 0  # stop after N validations with no better AUC (0: off)

  config.eval.batch_size = 1024  # global evaluation batch
  config.eval.report_step = "best"  # final metrics of the "best" validation step | the "last" step
  config.eval.final_test = True  # evaluate the reported step on test at the end (False: valid only)
  # Periodic validation on about this many examples of whole users (0: the whole split)
  config.eval.periodic_valid_examples = 0

  config.checkpoint.every_steps = 500  # plus one at the end of training
  config.checkpoint.max_to_keep = 3  # newest checkpoints kept

  # Row-sharded embedding tables over a data x model mesh (docs/training.md, "Sharded ...").
  sharding = config.sharding
  sharding.model = 1  # devices along "model" (1: pure data parallelism)
  sharding.row_shard_min_rows = 0  # row-shard the tables of at least this many ids (0: none)
  sharding.row_shard_fields = ""  # e.g. "item_id,user_id": row-shard these, whatever their size
  sharding.row_multiple = 64  # a sharded table's rows are rounded up to this; "model" divides it
  if reading == "paper_literal":
    config.update_from_flattened_dict(PAPER_LITERAL)
  return config


def parse_arg(arg: str | None, allowed: dict[str, object]) -> dict[str, object]:
  """Parses a config argument "key=value,..." strictly: `allowed` maps each key to its default,
  whose type values take; `model` ("mian") and `reading` ("default") are always allowed."""
  allowed = {"model": "mian", "reading": "default", **allowed}
  values = dict(allowed)
  for item in arg.split(",") if arg else []:
    key, sep, value = item.partition("=")
    if not sep or key not in allowed:
      raise ValueError(f"config argument {item!r}: expected key=value with key in "
                       f"{sorted(allowed)}")
    values[key] = value == "True" if isinstance(allowed[key], bool) else type(allowed[key])(value)
  return values


def get_config_from_args(args: dict[str, object]) -> ml_collections.ConfigDict:
  """The base config of the `reading` named in parsed config arguments, for model `model`."""
  config = get_base_config(args["reading"])
  config.model.name = args["model"]
  return config


# config argument `protocol` of the Amazon data sets (docs/data.md); "mian" is §4.1's.
AMAZON_PROTOCOLS = ("mian", "din", "dien")


def get_amazon_config(dataset: str, args: dict[str, object]) -> ml_collections.ConfigDict:
  """The config of an Amazon data set ("books" | "electronics") from parsed config arguments
  (model, reading, protocol); configs/books.py, electronics.py and amazon_like.py build on it."""
  if args["protocol"] not in AMAZON_PROTOCOLS:
    raise ValueError(f"config argument protocol={args['protocol']!r}: expected one of "
                     f"{AMAZON_PROTOCOLS}")
  config = get_config_from_args(args)

  config.data.source = "amazon"
  config.data.dataset = dataset  # "books" | "electronics"
  config.data.protocol = args["protocol"]  # "mian" (§4.1, default) | "din" | "dien"
  config.data.raw_dir = ""  # "" = <cache>/raw/amazon; files are downloaded there if missing
  # where missing raw files are downloaded from (Amazon 2014, SNAP)
  config.data.base_url = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
  config.data.max_bad_row_ratio = 0.01  # fail if more of the lines than this are unusable
  config.data.drop_duplicate_reviews = True  # keep only the earliest review of a (user, item) pair
  config.data.seed = 0  # negatives, (dien) the test users, (din, dien) the validation users
  # Validation that scales with the data (docs/training.md, "What a validation costs").
  config.train.eval_every_steps = 0  # validation every eval_every_epochs instead
  config.train.eval_every_epochs = 0.1  # ten validations an epoch, whatever the data's size
  config.eval.periodic_valid_examples = 100_000  # each on 100 k examples of whole users
  # Rows a batch did not use are left alone: no worse and 5x faster at Books size (docs/model.md).
  config.train.optimizer = "lazy_adam"
  if args["reading"] == "paper_literal":
    config.update_from_flattened_dict(AMAZON_LITERAL)
  return config
