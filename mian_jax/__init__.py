"""mian-jax: MIAN (Zhang et al., WSDM 2021) and CTR baselines in JAX/Flax."""
