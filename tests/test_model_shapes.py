"""Full-size configs traced with jax.eval_shape (allocates nothing), and config handling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.model import ModelConfig, TextConfig, abstract_params, forward, \
    from_size, init_params, param_axes

# Parameter counts published on the Qwen2.5-VL model cards (billions, rounded).
PUBLISHED_BILLIONS = {"qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen2.5-vl-32b": 33.5,
                      "qwen2.5-vl-72b": 73.4}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_full_size_parameter_count_matches_published(name):
  params = abstract_params(from_size(name))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e9
  assert abs(total - PUBLISHED_BILLIONS[name]) / PUBLISHED_BILLIONS[name] < 0.005, total


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b"])
def test_full_size_forward_shape_and_dtype(name):
  config = from_size(name, dtype="bfloat16")
  params = abstract_params(config)
  ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  pixels = jax.ShapeDtypeStruct((64, config.vision.patch_dim), jnp.float32)
  grid = jax.ShapeDtypeStruct((1, 3), jnp.int32)
  out = jax.eval_shape(lambda p, i, m, px, g: forward(config, p, i, m, px, g), params, ids,
                       ids, pixels, grid)
  assert out.shape == (2, 64, config.text.vocab_size) and out.dtype == jnp.float32


def test_every_leaf_has_a_logical_name_per_dim():
  config = from_size("qwen2.5-vl-3b")
  specs = jax.tree.leaves(param_axes(config),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(abstract_params(config))
  assert len(specs) == len(leaves)
  for spec, leaf in zip(specs, leaves):
    assert len(spec) == leaf.ndim
  # Scanned stacks carry the layers axis first; the big matrices are fully named.
  layer_specs = param_axes(config)["decoder"]["layers"]
  assert layer_specs["q"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "head_dim")
  assert layer_specs["mlp"]["down"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "mlp", "embed")


@pytest.mark.parametrize("change, match", [
    (dict(text=TextConfig(hidden_size=64, num_attention_heads=5)), "not divisible"),
    (dict(text=TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3,
                          mrope_section=(2, 3, 3))), "not a multiple"),
    (dict(text=TextConfig(hidden_size=64, num_attention_heads=4, mrope_section=(4, 4, 4))),
     r"mrope_section \(4, 4, 4\) sums to 12; expected head_dim/2 = 8"),
    (dict(dtype="fp8"), "model dtype 'fp8'"),
    (dict(remat="sometimes"), "model remat 'sometimes'"),
])
def test_bad_config_is_rejected_with_the_field_named(change, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(ModelConfig(), **change)


def test_unknown_size_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown model size 'qwen9'.*qwen2.5-vl-7b"):
    from_size("qwen9")


@pytest.mark.slow
def test_remat_and_bf16_do_not_change_the_function():
  """Remat policies give the same logits and gradients; bf16 stays close to fp32."""
  base = ModelConfig(
      vision=dataclasses.replace(ModelConfig().vision, depth=2, hidden_size=32,
                                 intermediate_size=48, num_heads=2, out_hidden_size=64,
                                 fullatt_block_indexes=(1,)),
      text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)))
  params = init_params(base, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 100)
  mask = jnp.ones_like(ids)

  def loss(p, cfg):
    return jnp.mean(forward(cfg, p, ids, mask) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_val, ref_grad = value_and_grad(params, base)
  for policy in ("full", "attention_out"):
    val, grad = value_and_grad(params, base.replace(remat=policy))
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)
  fwd = jax.jit(forward, static_argnums=0)
  bf16 = fwd(base.replace(dtype="bfloat16"), params, ids, mask)
  fp32 = fwd(base, params, ids, mask)
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(bf16 - fp32))) < 0.05 * float(jnp.max(jnp.abs(fp32))) + 0.05
