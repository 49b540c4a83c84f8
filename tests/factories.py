"""Tiny-model and input factories for tests (no downloads: everything is built here)."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from atlas_jax import random_checkpoint

# Tests compile many small programs and run each a few times, so compile time is most of
# the suite's CPU time; every check compares results, not speed. LLVM at -O0, and XLA:CPU's
# classic loop emitters instead of its MLIR fusion emitters: the tiny SFT step compiles in
# 1.7 s instead of 5.7 s (11.6 s at the defaults) and runs about as fast.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test process (conftest) or a subprocess with `devices` fake CPUs."""
  if devices == 1:
    return TEST_XLA_FLAGS
  return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


@contextlib.contextmanager
def optimized_compiles(level: int = 1):
  """Within: the training steps and the sampler's prefill and decode compile with LLVM at
  -O`level` (per jit, through compiler_options) instead of the session's -O0. For the
  tests that run one compiled step many times (the learning runs): at -O1 the tiny SFT
  step compiles in ~4 s instead of ~1.5 s and runs about twice as fast. Leave it on for
  every run a bitwise comparison pairs (a resume and its original), so both run the same
  executables."""
  from unittest import mock

  import jax

  from atlas_jax import sampler
  from atlas_jax.run import steps
  option = {"xla_backend_optimization_level": level}
  options = steps.gradient_compiler_options
  jit = lambda fn, donate, *static: jax.jit(fn, static_argnames=("config", "settings") + static,
                                            static_argnums=0, donate_argnums=donate,
                                            compiler_options=option)
  with mock.patch.object(steps, "gradient_compiler_options",
                         lambda platform: {**(options(platform) or {}), **option}), \
       mock.patch.object(sampler, "jit_prefill", jit(sampler.prefill, ())), \
       mock.patch.object(sampler, "jit_decode", jit(sampler.decode, 2, "one_layer_at_a_time")):
    yield


IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 390, 391, 392, 393
VOCAB = 400

# Three configs that differ in what the architecture branches on: tied/untied embeddings,
# GQA ratio, mrope_section, window size, full-attention blocks and vision depth (shapes in
# `atlas_jax.random_checkpoint.hf_config`'s terms; the vocab is VOCAB).
TINY_CONFIGS = {
    "tied_mha": dict(
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, mrope_section=[2, 3, 3],
                  tie_word_embeddings=True),
        vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                    window_size=56, fullatt_block_indexes=[1])),
    "gqa2_wide_window": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 2, 2],
                  tie_word_embeddings=False),
        vision=dict(depth=4, hidden_size=48, intermediate_size=64, num_heads=3,
                    window_size=112, fullatt_block_indexes=[0, 3])),
    "gqa4_unit_window": dict(
        text=dict(hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, mrope_section=[2, 3, 3],
                  tie_word_embeddings=False),
        vision=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2,
                    window_size=28, fullatt_block_indexes=[])),
}


def hf_config(name: str):
  spec = TINY_CONFIGS[name]
  return random_checkpoint.hf_config(
      dict(spec["text"], vocab_size=VOCAB), spec["vision"], image_token_id=IMAGE_TOKEN,
      video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
      vision_end_token_id=VISION_END)


def make_hf_model(name: str, seed: int = 0):
  """A random fp32 HF model in eval mode, with non-trivial norms and biases."""
  return random_checkpoint.random_model(hf_config(name), seed=seed)


def save_tiny_hf(name: str, path: str, seed: int = 0, **save_kwargs):
  return random_checkpoint.write(path, hf_config(name), seed=seed, **save_kwargs)


def random_image(rng: np.random.Generator, height: int, width: int):
  from PIL import Image
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_pixels(images):
  """pixel_values, image_grid_thw from transformers' own Qwen2.5-VL image processor."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
      Qwen2VLImageProcessorPil
  proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
  out = proc(images=images, return_tensors="np")
  return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def prompt_ids(rng: np.random.Generator, segments) -> list[int]:
  """Token ids from segments: an int n is n random text tokens, ("img", k) an image with
  k pad tokens wrapped in vision start/end."""
  ids: list[int] = []
  for seg in segments:
    if isinstance(seg, tuple):
      ids += [VISION_START] + [IMAGE_TOKEN] * seg[1] + [VISION_END]
    else:
      ids += rng.integers(3, 380, seg).tolist()
  return ids


def pad_batch(rows: list[list[int]], side: list[str], pad_id: int = 2):
  """Pads rows to one length; side[i] is "left" or "right" for row i."""
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, (r, s) in enumerate(zip(rows, side)):
    sl = slice(t - len(r), t) if s == "left" else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask


def save_tiny_hf_with_tokenizer(path: str, name: str = "gqa2_wide_window", spare_rows: int = 0,
                                seed: int = 0):
  """A tiny random HF model whose vocab and special ids come from the tiny tokenizer, saved
  with that tokenizer (a self-consistent local "hub" checkpoint). Returns (model, tokenizer)."""
  from atlas_jax.data.tokenizer import build_tokenizer
  tok = build_tokenizer(path)
  cfg = hf_config(name)
  ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
  for k, v in ids.items():
    setattr(cfg, k, v)
  cfg.text_config.vocab_size = len(tok) + spare_rows
  cfg.text_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
  cfg.text_config.pad_token_id = tok.pad_token_id
  cfg.text_config.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
  model = random_checkpoint.write(path, cfg, seed=seed, norm_noise=0.0)
  return model, tok


def tiny_model_config():
  """A small atlas_jax ModelConfig whose dims divide meshes of up to 8 devices."""
  from atlas_jax.model import ModelConfig, TextConfig, VisionConfig
  return ModelConfig(
      vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                          out_hidden_size=64, window_size=56, fullatt_block_indexes=(1,)),
      text=TextConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
      image_token_id=250)


def override(c, changes: dict):
  """Sets "group.field" keys of an ml_collections config (test configs' keyword changes)."""
  for key, value in changes.items():
    group, field = key.split(".")
    c[group][field] = value
  return c


def free_port() -> int:
  """A localhost TCP port nobody listens on (for a jax.distributed coordinator)."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(commands: list[list[str]], *, cwd: str, env: dict,
                  timeout: float) -> list[str]:
  """Starts every command at once (the processes of one multi-process job), waits for all
  and returns their stdouts; a failed process fails the test with its output's tail. No
  process outlives the call."""
  from launch.processes import run_together
  outputs = run_together(commands, cwd=cwd, env=env, timeout=timeout)
  for i, (code, out, err) in enumerate(outputs):
    assert code == 0, (f"process {i} exited {code}\n--- stdout\n"
                       f"{out[-2000:]}\n--- stderr\n{err[-4000:]}")
  return [out for _, out, _ in outputs]


def restore_state_numpy(checkpoints: str, step: int) -> dict:
  """The TrainState saved at `step` under a Checkpointer directory, as numpy arrays (params,
  optimizer state, rng, ...), read without a mesh or the state's structure."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(checkpoints, str(step), "state")
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            getattr(tree, "tree", tree))
    return ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def assert_saved_states_equal(workdir_a: str, workdir_b: str, step: int) -> None:
  """The TrainStates two runs saved at `step` are bitwise equal, leaf by leaf (and there are
  leaves)."""
  import orbax.checkpoint as ocp
  a, b = (ocp.tree.to_flat_dict(restore_state_numpy(os.path.join(d, "checkpoints"), step))
          for d in (workdir_a, workdir_b))
  assert a.keys() == b.keys() and a
  for k in a:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k
