"""Query-chunked attention is exact: same outputs and gradients as the one-block version."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import config as config_lib
from atlas_jax.model import attention as attention_lib
from atlas_jax.model import forward, init_params
from tests import factories


def _inputs(t=16, s=16):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
  mask = np.tril(np.ones((t, s), bool))[None].repeat(2, 0)
  mask[1, :, :3] = False  # left padding in row 1 (its first query rows see nothing)
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_attention_matches_outputs_and_gradients(chunk):
  q, k, v, mask = _inputs()
  full = attention_lib.attention(q, k, v, mask)
  part = attention_lib.attention(q, k, v, mask, chunk=chunk)
  np.testing.assert_allclose(part, full, atol=1e-6)
  loss = lambda c: lambda q, k, v: jnp.sum(jnp.sin(attention_lib.attention(q, k, v, mask, chunk=c)))
  g_full = jax.grad(loss(0), argnums=(0, 1, 2))(q, k, v)
  g_part = jax.grad(loss(chunk), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_part, g_full):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunk_that_does_not_divide_falls_back_to_one_block():
  q, k, v, mask = _inputs(t=12, s=12)
  np.testing.assert_allclose(attention_lib.attention(q, k, v, mask, chunk=5),
                             attention_lib.attention(q, k, v, mask), atol=1e-6)


def test_model_forward_with_attention_chunk_matches():
  config = factories.tiny_model_config()
  params = init_params(config, jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 240, (2, 16)), jnp.int32)
  mask = jnp.ones((2, 16), jnp.int32).at[1, :5].set(0)
  ref = forward(config, params, ids, mask) * mask[..., None]
  chunked = dataclasses.replace(config, attention_chunk=4)
  out = forward(chunked, params, ids, mask) * mask[..., None]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  with pytest.raises(ValueError, match="attention_chunk"):
    dataclasses.replace(config, attention_chunk=-1)


# --- attention implementations (model.attention_impl) --------------------------------------

from atlas_jax.model import vlm  # noqa: E402


def _reference(q, k, v, mask):
  """The 5-D einsum attention this module replaced, as the definition."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * h**-0.5
  logits = jnp.where(mask[:, None, None], logits, attention_lib.NEG_INF)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(logits, axis=-1), v)
  return out.reshape(b, t, n, h)


def _padded_inputs(t=128, b=2, n=4, kv=2, h=32):
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
             for heads in (n, kv, kv))
  am = np.ones((b, t), np.int32)
  am[-1, :11] = 0  # left padding (the last row)
  return q, k, v, jnp.asarray(am)


def test_xla_grouped_layout_matches_the_5d_einsum():
  q, k, v, mask = _inputs()
  np.testing.assert_allclose(attention_lib.attention(q, k, v, mask), _reference(q, k, v, mask),
                             atol=1e-6)


def test_cudnn_dispatch_matches_xla_on_cpu():
  # cuDNN needs a GPU; on CPU the same call with implementation="xla" checks the
  # argument layout (GQA heads, [B, 1, T, S] mask) that the cudnn path passes.
  q, k, v, am = _padded_inputs(t=16)
  mask = vlm.text_mask(am)
  want = attention_lib.attention(q, k, v, mask)
  got = attention_lib._cudnn(q, k, v, mask, implementation="xla")
  real = np.asarray(am)[:, :, None, None]
  np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=1e-5)
  with pytest.raises(ValueError, match="cudnn"):
    dataclasses.replace(factories.tiny_model_config(), attention_impl="cudnn")
  with pytest.raises(ValueError, match="attention_impl"):
    dataclasses.replace(factories.tiny_model_config(), attention_impl="flash")


def test_auto_attention_is_splash_on_tpu_and_the_einsums_elsewhere():
  from atlas_jax.run import setup
  from configs import sft
  c = sft.get_config("qwen2.5-vl-7b")
  chosen = lambda platform: setup.runtime_options(c, platform)["attention_impl"]
  assert c.model.attention_impl == "auto"  # the published recipes
  assert (chosen("tpu"), chosen("gpu"), chosen("cpu")) == ("splash", "xla", "xla")
  c.model.attention_impl = "cudnn"  # an explicit choice is kept
  assert chosen("gpu") == chosen("tpu") == "cudnn"
  c.model.attention_impl = "flash"  # refused before any work, naming the field
  with pytest.raises(ValueError, match="config.model.attention_impl 'flash'"):
    config_lib.validate(c)


def test_splash_interpret_matches_xla_causal_padding_gqa():
  q, k, v, am = _padded_inputs()
  mask = vlm.text_mask(am)
  want = attention_lib.attention(q, k, v, mask)
  got = attention_lib.attention(q, k, v, mask, impl="splash")  # interpret mode off TPU
  real = np.asarray(am)[:, :, None, None]  # padded query rows are ignored by callers
  np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=2e-5)


def test_splash_interpret_gradients_match_xla():
  q, k, v, am = _padded_inputs(t=128, b=1, n=2, kv=1, h=16)
  am = am.at[0, :7].set(0)
  mask = vlm.text_mask(am)
  real = am.astype(jnp.float32)[:, :, None, None]
  loss = lambda impl: lambda q, k, v: jnp.sum(
      jnp.sin(attention_lib.attention(q, k, v, mask, impl=impl)) * real)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_splash_vision_window_segments_match_xla():
  rng = np.random.default_rng(4)
  seg = jnp.asarray(np.repeat(np.arange(4), 16), jnp.int32).at[-8:].set(-1)  # 8 padded
  q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32) for _ in range(3))
  mask = attention_lib.Mask(dense=(seg[:, None] == seg[None, :])[None], segment_ids=seg[None])
  np.testing.assert_allclose(attention_lib.attention(q, k, v, mask, impl="splash"),
                             attention_lib.attention(q, k, v, mask), atol=2e-5)


def test_model_forward_with_splash_matches_xla():
  config = dataclasses.replace(factories.tiny_model_config(), attention_impl="splash")
  params = init_params(config, jax.random.key(0))
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 240, (2, 16)), jnp.int32)
  mask = jnp.ones((2, 16), jnp.int32).at[1, :5].set(0)
  ref = forward(dataclasses.replace(config, attention_impl="xla"), params, ids, mask)
  out = forward(config, params, ids, mask)
  np.testing.assert_allclose(out * mask[..., None], ref * mask[..., None], atol=1e-4)


# Runs with 8 fake CPU devices: splash (interpreted) under a fsdp=4 x tensor=2 mesh, each
# device on its part (a shard_map), against the einsums on one device.
MESH_SCRIPT = """
import json, os
from tests import factories
os.environ["XLA_FLAGS"] = factories.xla_flags(8)
import jax, jax.numpy as jnp, numpy as np
from atlas_jax import sharding
from atlas_jax.model import attention as A
mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
rng = np.random.default_rng(0)
out = {}
# Text: 4 causal rows (left padding in row 1), GQA 4 query heads over 2 kv heads.
q, k, v = (jnp.asarray(rng.normal(size=(4, 128, h, 16)), jnp.float32) for h in (4, 2, 2))
am = np.ones((4, 128), np.int32); am[1, :9] = 0
seg = jnp.asarray(am)
dense = jnp.asarray(np.tril(np.ones((128, 128), bool))[None] & (am[:, None, :] > 0))
text = A.Mask(dense=dense, segment_ids=seg, causal=True)
# Vision: one sequence of 512 patches in windows of 64, the last 8 padding.
ids = np.repeat(np.arange(8), 64); ids[-8:] = -1
vq, vk, vv = (jnp.asarray(rng.normal(size=(1, 512, 2, 16)), jnp.float32) for _ in range(3))
vision = A.Mask(dense=jnp.asarray(ids[:, None] == ids[None, :])[None],
                segment_ids=jnp.asarray(ids, jnp.int32)[None])
real = am[:, :, None, None]
loss = lambda impl, mask, w: lambda q, k, v: jnp.sum(
    jnp.sin(A.attention(q, k, v, mask, impl=impl)) * w)
for name, (args, mask, w) in {"text": ((q, k, v), text, real),
                              "vision": ((vq, vk, vv), vision, 1.0)}.items():
  want = A.attention(*args, mask)
  grads_want = jax.grad(loss("xla", mask, w), argnums=(0, 1, 2))(*args)
  with sharding.with_rules(mesh):
    f = jax.jit(lambda *a: A.attention(*a, mask, impl="splash"))
    got = f(*args)
    grads = jax.jit(jax.grad(loss("splash", mask, w), argnums=(0, 1, 2)))(*args)
    jaxpr = str(jax.make_jaxpr(lambda *a: A.attention(*a, mask, impl="splash"))(*args))
  out[name] = {"out": float(np.max(np.abs((np.asarray(got) - np.asarray(want)) * w))),
               "grad": max(float(np.max(np.abs(a - b))) for a, b in zip(grads, grads_want)),
               "shard_map": "shard_map" in jaxpr}
# The decode's kernel: 8 rows of one query against a 256-slot cache, rows over fsdp.
dq = jnp.asarray(rng.normal(size=(8, 1, 4, 16)), jnp.float32)
dk, dv = (jnp.asarray(rng.normal(size=(8, 2, 256, 16)), jnp.float32) for _ in range(2))
keys = jnp.asarray(np.arange(256)[None] < np.arange(100, 108)[:, None])
want = A.grouped(dq, dk, dv, keys[:, None])
with sharding.with_rules(mesh):
  got = jax.jit(A.decode_kernel)(dq, dk, dv, keys, jnp.int32(107))
  jaxpr = str(jax.make_jaxpr(A.decode_kernel)(dq, dk, dv, keys, jnp.int32(107)))
out["decode"] = {"out": float(np.max(np.abs(np.asarray(got) - np.asarray(want)))), "grad": 0.0,
                 "shard_map": "shard_map" in jaxpr}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_splash_under_a_mesh_runs_per_device_and_matches_xla():
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=root, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  for name in ("text", "vision", "decode"):  # rows over fsdp; the vision's queries
    r = result[name]
    assert r["shard_map"], name  # XLA cannot partition a Mosaic kernel: each device its part
    assert r["out"] < 2e-5 and r["grad"] < 1e-4, (name, r)


@pytest.mark.parametrize("rows,slots,last", [(16, 2048, 700), (3, 384, 100)])
def test_decode_kernel_matches_the_einsums_and_skips_unwritten_blocks(rows, slots, last):
  """The decode's kernel (interpreted off TPU): one query per row against a cache, GQA,
  left padding; slots past `last`'s block hold NaN, which the einsums would spread (0 x NaN)
  but the kernel never reads."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(rows, 1, 6, 16)), jnp.float32)
  k, v = (rng.normal(size=(rows, 2, slots, 16)).astype(np.float32) for _ in range(2))
  keys = np.zeros((rows, slots), bool)
  keys[:, 5:last + 1] = True
  keys[1, :20] = False  # a row with more padding
  keys[2, :last - 50] = False  # more than a block of it (2048 slots: blocks of 512)
  want = attention_lib.grouped(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(keys)[:, None])
  block = attention_lib.decode_blocks(slots)
  past = (last // block + 1) * block
  k[:, :, past:], v[:, :, past:] = np.nan, np.nan
  got = attention_lib.decode_kernel(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(keys),
                                    jnp.int32(last))
  assert past < slots  # the einsums over the same cache do read the NaN slots:
  assert np.isnan(attention_lib.grouped(q, jnp.asarray(k), jnp.asarray(v),
                                        jnp.asarray(keys)[:, None])).any()
  np.testing.assert_allclose(got, want, atol=2e-6)
