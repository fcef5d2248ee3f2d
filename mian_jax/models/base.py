"""What the deep models share: the fields they read from config.model, the embedding layer
(eq. 2), and (Wide&Deep, DeepFM, xDeepFM) the linear and deep parts over one field list."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mian_jax.data.schema import FeatureSpec
from mian_jax.errors import ConfigError
from mian_jax.models import layers

# DIN's and DIEN's final MLP inputs (docs/baselines.md): "reference" adds the authors' code's
# products of the candidate with the pooled behaviours; "paper" has the papers' figures' only.
BaselineInputs = Literal["reference", "paper"]


def candidate_query(features: FeatureSpec, item: jax.Array) -> jax.Array:
  """The candidate's behaviour fields in behaviour order, [B, Fi, D] -> [B, d_b]: the layout
  of each behaviour e_b^t (DIN's q - k, q * k; DIEN's e_a)."""
  names = [f.name for f in features.item_fields]
  return layers.flatten_fields(item[:, [names.index(n) for n in features.behavior_fields]])


def flat(x: jax.Array | None) -> jax.Array | None:
  """`layers.flatten_fields` of a field group that may be missing (None)."""
  return None if x is None else layers.flatten_fields(x)


def oldest_first(batch):
  """`batch` with each history in time order (stored newest first, docs/data.md)."""
  return {**batch, "hist": {k: layers.reverse_valid(v, batch["hist_len"])
                            for k, v in batch["hist"].items()}}


def require_behaviours(features: FeatureSpec, model: str) -> None:
  if not features.behavior_fields:
    raise ConfigError(f"model.name={model!r} needs behaviour fields; this data set has none")


class DeepModel(nn.Module):
  """Base of the deep models. No defaults: `models.create_model` fills every field from
  config.model, whose defaults are the only ones."""
  features: FeatureSpec
  embed_dim: int
  mlp_dims: tuple[int, ...]
  dropout_rate: float
  dropout_rng: layers.DropoutRng
  init_std: float
  dense_init: layers.DenseInit
  numeric_embedding: layers.NumericEmbedding

  def kernel_init(self) -> nn.initializers.Initializer:
    return layers.dense_initializer(self.dense_init, self.init_std)

  def embed(self, batch) -> layers.FieldEmbeddings:
    """Eq. (2) for every field group; call from a compact method (creates "embedding")."""
    return layers.InputEmbedding(self.features, self.embed_dim, self.init_std,
                                 self.numeric_embedding, name="embedding")(batch)

  def mlp(self, x: jax.Array, *, train: bool) -> jax.Array:
    """The ReLU MLP "mlp" (eq. 16) of MIAN, DCN, Wide&Deep, DeepFM and xDeepFM."""
    return layers.MLP(self.mlp_dims, self.dropout_rate, self.kernel_init(), self.dropout_rng,
                      name="mlp")(x, deterministic=not train)


class FieldListModel(DeepModel):
  """A deep model over one field list [B, F, D], behaviours pooled into one field each."""
  sequence_pooling: layers.SequencePooling

  def linear_and_deep(self, batch, linear_name: str, *, train: bool):
    """Wide&Deep's, DeepFM's and xDeepFM's linear part (`LinearTerm` `linear_name`) and deep
    part (`mlp` over the flattened fields, then the bias-free "deep_logit").
    Returns (linear [B], deep [B], fields [B, F, D], sq_norm [B])."""
    linear, linear_sq = layers.LinearTerm(self.features, self.init_std, self.sequence_pooling,
                                          name=linear_name)(batch)
    e = self.embed(batch)
    fields = layers.stack_fields(e, self.sequence_pooling)
    h = self.mlp(fields.reshape(fields.shape[0], -1), train=train)
    deep = nn.Dense(1, use_bias=False, kernel_init=self.kernel_init(), name="deep_logit")(h)
    return linear, deep[:, 0], fields, linear_sq + e.sq_norm


class InterestModel(DeepModel):
  """DIN and DIEN: a user interest from the behaviours, then an MLP with PReLU or Dice."""
  use_dice: bool
  baseline_inputs: BaselineInputs

  def head(self, parts: list[jax.Array | None], *, train: bool) -> jax.Array:
    """MLP "mlp" (PReLU or Dice) and "logit" over the concatenated parts [B, d_p] -> [B];
    a part of a missing field group is None."""
    x = jnp.concatenate([p for p in parts if p is not None], -1)
    h = layers.MLP(self.mlp_dims, self.dropout_rate, self.kernel_init(), self.dropout_rng,
                   "dice" if self.use_dice else "prelu", name="mlp")(x, deterministic=not train)
    return nn.Dense(1, kernel_init=self.kernel_init(), name="logit")(h)[:, 0]
