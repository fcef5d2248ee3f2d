"""What the deep models share: config.model fields, the embedding (eq. 2), the MLP (eq. 16)."""

from __future__ import annotations

import flax.linen as nn
import jax

from mian_jax.data.schema import FeatureSpec
from mian_jax.models import layers


def candidate_query(features: FeatureSpec, item: jax.Array) -> jax.Array:
  """The candidate's behaviour fields in behaviour order, [B, Fi, D] -> [B, d_b]: the layout
  of each behaviour e_b^t (DIN's q - k, q * k; DIEN's e_a)."""
  names = [f.name for f in features.item_fields]
  return layers.flatten_fields(item[:, [names.index(n) for n in features.behavior_fields]])


def oldest_first(batch):
  """`batch` with each history in time order (stored newest first, docs/data.md)."""
  return {**batch, "hist": {k: layers.reverse_valid(v, batch["hist_len"])
                            for k, v in batch["hist"].items()}}


class DeepModel(nn.Module):
  """Base of the deep models; no defaults: `models.create_model` fills them from config.model."""
  features: FeatureSpec
  embed_dim: int
  mlp_dims: tuple[int, ...]
  dropout_rate: float
  dropout_rng: layers.DropoutRng
  init_std: float
  dense_init: layers.DenseInit
  numeric_embedding: layers.NumericEmbedding

  def kernel_init(self) -> nn.initializers.Initializer:
    """Truncated normal (std init_std, §4.3) or LeCun normal (unit-scale activations)."""
    if self.dense_init == "truncated_normal":
      return nn.initializers.truncated_normal(self.init_std)
    return nn.initializers.lecun_normal()

  def embed(self, batch) -> layers.FieldEmbeddings:
    """Eq. (2) for every field group; call from a compact method (creates "embedding")."""
    return layers.InputEmbedding(self.features, self.embed_dim, self.init_std,
                                 self.numeric_embedding, name="embedding")(batch)

  def mlp(self, x: jax.Array, *, train: bool, activation: str = "relu") -> jax.Array:
    """The MLP "mlp" (eq. 16): ReLU, or PReLU or Dice in DIN and DIEN."""
    return layers.MLP(self.mlp_dims, self.dropout_rate, self.kernel_init(), self.dropout_rng,
                      activation, name="mlp")(x, deterministic=not train)
