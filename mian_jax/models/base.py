"""What every deep model shares: the hyper-parameters it reads from config.model and its
embedding layer (eq. 2). Model-specific hyper-parameters are fields of the subclasses."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax

from mian_jax.data.schema import FeatureSpec
from mian_jax.errors import ConfigError
from mian_jax.models import layers


# What DIN's and DIEN's final MLP reads besides the user, item and context fields
# (docs/baselines.md): "reference", the extra inputs of the authors' code (products of the
# candidate with the pooled behaviours); "paper", only the inputs of the papers' figures.
BaselineInputs = Literal["reference", "paper"]


def candidate_query(features: FeatureSpec, item: jax.Array) -> jax.Array:
  """The candidate's behaviour fields, in behaviour order: [B, Fi, D] -> [B, d_b], so that the
  query and each behaviour e_b^t have the same layout (DIN's q - k, q * k; DIEN's e_a)."""
  names = [f.name for f in features.item_fields]
  return layers.flatten_fields(item[:, [names.index(n) for n in features.behavior_fields]])


def require_behaviours(features: FeatureSpec, model: str) -> None:
  if not features.behavior_fields:
    raise ConfigError(f"model.name={model!r} needs behaviour fields; this data set has none")


class DeepModel(nn.Module):
  """Base of the deep models; `models.create_model` fills the fields from config.model."""
  features: FeatureSpec
  embed_dim: int = 16
  mlp_dims: tuple[int, ...] = (32, 8)
  dropout_rate: float = 0.2
  dropout_rng: layers.DropoutRng = "hash"
  init_std: float = 0.02
  dense_init: layers.DenseInit = "lecun_normal"
  numeric_embedding: layers.NumericEmbedding = "linear"

  def kernel_init(self) -> nn.initializers.Initializer:
    return layers.dense_initializer(self.dense_init, self.init_std)

  def embed(self, batch) -> layers.FieldEmbeddings:
    """Eq. (2) for every field group; call from a compact method (creates "embedding")."""
    return layers.InputEmbedding(self.features, self.embed_dim, self.init_std,
                                 self.numeric_embedding, name="embedding")(batch)

  def deep_logit(self, fields: jax.Array, *, train: bool) -> jax.Array:
    """The deep part of Wide&Deep, DeepFM and xDeepFM: MLP over the flattened fields
    [B, F, D], then a bias-free logit [B]; call from a compact method ("mlp", "deep_logit")."""
    h = layers.MLP(self.mlp_dims, self.dropout_rate, self.kernel_init(), self.dropout_rng,
                   name="mlp")(fields.reshape(fields.shape[0], -1), deterministic=not train)
    return nn.Dense(1, use_bias=False, kernel_init=self.kernel_init(), name="deep_logit")(h)[:, 0]
