"""The jitted KV-cache sampler against transformers' generate and the training forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax import hf
from atlas_jax import sampler as sampler_lib
from atlas_jax.model import vlm
from atlas_jax.sampler import Sampler, SamplerSettings
from tests import factories as F

NAME = "gqa2_wide_window"
EOS = 1
BLOCKED = (F.IMAGE_TOKEN, F.VIDEO_TOKEN, F.VISION_START, F.VISION_END)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sampler"))
  hf_model = F.save_tiny_hf(NAME, path)
  config, params = hf.load(path)
  return hf_model, config, params


def _allowed(vocab):
  allowed = np.ones(vocab, bool)
  allowed[list(BLOCKED)] = False
  return allowed


def _prompts(seed=0):
  """Two left-padded prompts with images of different sizes (batch-major pixels)."""
  rng = np.random.default_rng(seed)
  images = [F.random_image(rng, 56, 84), F.random_image(rng, 84, 56)]
  pixel_values, grid = F.hf_pixels(images)
  rows = [F.prompt_ids(rng, [3, ("img", int(grid[0].prod()) // 4), 6]),
          F.prompt_ids(rng, [1, ("img", int(grid[1].prod()) // 4), 2])]
  ids, mask = F.pad_batch(rows, ["left", "left"])
  per = int(grid[0].prod())
  batched_px = np.stack([pixel_values[:per], pixel_values[per:]])
  return ids, mask, pixel_values, grid, batched_px, grid[:, None]


def test_greedy_equals_transformers_generate(model):
  hf_model, config, params = model
  ids, mask, px, grid, bpx, bgrid = _prompts()
  n = 12
  with torch.no_grad():
    out = hf_model.generate(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
        pixel_values=torch.from_numpy(px), image_grid_thw=torch.from_numpy(grid),
        mm_token_type_ids=torch.from_numpy((ids == F.IMAGE_TOKEN).astype(np.int32)),
        max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=2,
        bad_words_ids=[[b] for b in BLOCKED])
  want = out[:, ids.shape[1]:].numpy()
  settings = SamplerSettings(max_new_tokens=n, greedy=True, stop_ids=(EOS,), pad_id=2)
  sampler = Sampler(config, settings, _allowed(config.text.vocab_size))
  got = sampler.sample(params, dict(input_ids=ids, attention_mask=mask, pixel_values=bpx,
                                    image_grid_thw=bgrid), jax.random.key(0))
  tokens, cmask = np.asarray(got["tokens"]), np.asarray(got["mask"])
  for r in range(len(ids)):
    k = int(cmask[r].sum())
    np.testing.assert_array_equal(tokens[r, :k], want[r, :k])


def test_sampler_logps_equal_training_forward(model):
  _, config, params = model
  ids, mask, _, _, bpx, bgrid = _prompts(1)
  settings = SamplerSettings(max_new_tokens=10, temperature=0.7, samples_per_prompt=2,
                             stop_ids=(EOS,), pad_id=2)
  sampler = Sampler(config, settings, _allowed(config.text.vocab_size))
  out = sampler.sample(params, dict(input_ids=ids, attention_mask=mask, pixel_values=bpx,
                                    image_grid_thw=bgrid), jax.random.key(3))
  tokens, cmask, logps = (np.asarray(out[k]) for k in ("tokens", "mask", "logps"))
  assert tokens.shape == (4, 10)
  full_ids = np.concatenate([np.repeat(ids, 2, 0), tokens], axis=1)
  full_mask = np.concatenate([np.repeat(mask, 2, 0), cmask], axis=1)
  logits = vlm.forward(config, params, full_ids, full_mask, np.repeat(bpx, 2, 0),
                       np.repeat(bgrid, 2, 0))
  logp_all = jax.nn.log_softmax(np.asarray(logits) / 0.7, axis=-1)
  t = ids.shape[1]
  want = np.take_along_axis(np.asarray(logp_all[:, t - 1:-1]), tokens[..., None], -1)[..., 0]
  diff = np.abs((want - logps) * cmask).max()
  print(f"\n[sampler] max |sampler logp - trainer logp| = {diff:.2e}")
  assert diff <= 1e-4


def test_blocked_ids_are_never_sampled_and_rows_stop(model):
  _, config, params = model
  rng = np.random.default_rng(5)
  ids, mask = F.pad_batch([F.prompt_ids(rng, [4]), F.prompt_ids(rng, [7])], ["left", "left"])
  allowed = _allowed(config.text.vocab_size)
  allowed[200:] = False  # as if the tokenizer owned only ids < 200
  settings = SamplerSettings(max_new_tokens=40, temperature=2.0, samples_per_prompt=4,
                             stop_ids=(EOS, 7), pad_id=2)
  out = Sampler(config, settings, allowed).sample(
      params, dict(input_ids=ids, attention_mask=mask), jax.random.key(1))
  tokens, cmask = np.asarray(out["tokens"]), np.asarray(out["mask"])
  assert not np.isin(tokens[cmask == 1], np.flatnonzero(~allowed)).any()
  assert len({tuple(r) for r in tokens}) > 1  # stochastic rows differ
  for r in range(len(tokens)):
    k = int(cmask[r].sum())
    stops = np.isin(tokens[r, :k], settings.stop_ids)
    assert stops.sum() <= 1 and (not stops.any() or stops[-1])  # ends at its first stop
    assert (tokens[r, k:] == 2).all()


@pytest.mark.parametrize("variant", ["one_layer_at_a_time", "decode_kernel"])
def test_decode_variants_sample_what_the_plain_decode_samples(model, variant):
  """From the same prefill state, the same tokens and log-probs as the decode over weights
  split once per call on the einsums: the decode that takes one layer's weights per token
  (fsdp meshes), and the one attending on `attention.decode_kernel` (attention_impl
  "splash"; interpreted off TPU)."""
  _, config, params = model
  rng = np.random.default_rng(7)
  ids, mask = F.pad_batch([F.prompt_ids(rng, [6]), F.prompt_ids(rng, [3])], ["left", "left"])
  settings = SamplerSettings(max_new_tokens=12, temperature=1.0, samples_per_prompt=2,
                             stop_ids=(EOS,), pad_id=2)
  allowed = jnp.asarray(_allowed(config.text.vocab_size))
  state = sampler_lib.jit_prefill(config, params, ids, mask, None, None, jax.random.key(3),
                                  allowed, settings=settings)
  variants = {"plain": (config, False), "one_layer_at_a_time": (config, True),
              "decode_kernel": (dataclasses.replace(config, attention_impl="splash"), False)}
  out = [sampler_lib.jit_decode(cfg, params, jax.tree.map(jnp.copy, state), allowed,
                                settings=settings, one_layer_at_a_time=flag)
         for cfg, flag in (variants["plain"], variants[variant])]
  np.testing.assert_array_equal(np.asarray(out[0].tokens), np.asarray(out[1].tokens))
  np.testing.assert_allclose(np.asarray(out[0].logps), np.asarray(out[1].logps), atol=1e-5)
  assert (np.asarray(out[0].logps) != 0).any()
  assert not sampler_lib.weights_split_over_batch(params)  # one device: split once


@pytest.mark.slow
def test_top_k_one_and_tiny_top_p_are_greedy(model):
  _, config, params = model
  rng = np.random.default_rng(6)
  ids, mask = F.pad_batch([F.prompt_ids(rng, [5]), F.prompt_ids(rng, [8])], ["left", "left"])
  batch = dict(input_ids=ids, attention_mask=mask)
  allowed = _allowed(config.text.vocab_size)
  greedy = Sampler(config, SamplerSettings(max_new_tokens=8, greedy=True), allowed).sample(
      params, batch, jax.random.key(0))["tokens"]
  for settings in (SamplerSettings(max_new_tokens=8, temperature=1.3, top_k=1),
                   SamplerSettings(max_new_tokens=8, temperature=1.3, top_p=1e-6)):
    got = Sampler(config, settings, allowed).sample(params, batch, jax.random.key(9))["tokens"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(greedy))


def test_prefill_writes_per_layer_caches_without_a_stacked_one(model):
  """The prefill's layer scan returns the prompts' keys and values, [L, B, K, T, H]; each
  layer's decode cache [R, K, S, H] is written from them once (the G rows of a prompt
  equal, zeros in the new tokens' slots), and no stacked [L, B, K, S, H] cache is built."""
  _, config, params = model
  rng = np.random.default_rng(8)
  ids, mask = F.pad_batch([F.prompt_ids(rng, [6]), F.prompt_ids(rng, [3])], ["left", "left"])
  n, g = 5, 3
  settings = SamplerSettings(max_new_tokens=n, samples_per_prompt=g, stop_ids=(EOS,), pad_id=2)
  allowed = jnp.asarray(_allowed(config.text.vocab_size))
  args = (config, params, ids, mask, None, None, jax.random.key(3), allowed)
  tc, (b, t) = config.text, ids.shape
  stacked = (tc.num_hidden_layers, b, tc.num_key_value_heads, t + n, tc.head_dim)
  hlo = sampler_lib.jit_prefill.lower(*args, settings=settings).as_text()
  tensor = lambda dims: "tensor<" + "x".join(map(str, dims)) + "x"
  assert tensor(stacked) not in hlo
  assert tensor(stacked[:3] + (t,) + stacked[4:]) in hlo  # the scan's keys and values

  state = sampler_lib.jit_prefill(*args, settings=settings)
  assert len(state.cache) == tc.num_hidden_layers
  for cache in state.cache:
    for x in (np.asarray(cache["k"]), np.asarray(cache["v"])):
      assert x.shape == (b * g, tc.num_key_value_heads, t + n, tc.head_dim)
      assert not x[:, :, t:].any()
      np.testing.assert_array_equal(x, np.repeat(x[::g], g, axis=0))
      assert x[:, :, :t].any()
