"""atlas_jax against transformers, side by side in one process, on the same random weights
and the same batch: greedy rollout, SFT step and LA-GRPO update.

  python -m launch.bench                       # the small and the wide model
  python -m launch.bench --models=small --batch=8 --prompt_text=48 --new_tokens=64
  python -m launch.bench --decode_lengths=128,512,1024,2048   # decode ms/token vs cache
  python -m launch.bench --models=small --steps=rl-shared --batch=1 --group_size=8 \
      --image_side=40 --new_tokens=64   # image-heavy RL: shared prompt vs not (bench_rl)

Each model is built by transformers with random weights and saved in HF layout
(`atlas_jax.random_checkpoint`), then loaded by `atlas_jax.hf.load`; both sides run on that
checkpoint. Throughputs are tokens per second with compile (and torch's first call)
excluded, the median of --repeats runs; the ratio is atlas_jax / transformers. The
fraction of matmul peak is the step's analytic FLOPs (`aot.model_flops` with dense
attention: 2 per weight per token forward, x3 with the backward pass, attention scores as
computed, every query against every key) per second over a timed square matmul in the
compute dtype (2048^2 on the CPU, 8192^2 on a GPU).
transformers gets `mm_token_type_ids`, without which it silently uses 1-D positions. The
training steps are `launch.train`'s (`sft.update.sft_step_fn`, `rl.update.rl_update_fn`)
on a one-device mesh. `--torch_device=cuda --dtype=bfloat16 --models=gpu --batch=16` puts
transformers on the GPU JAX uses and both sides in bf16 compute (fp32 weights): the
same-device comparison the device check (launch/device_check.sh) runs.

The rollout's floor on this machine is printed next to it: the prefill's analytic FLOPs at
the matmul peak, plus one read of the text decoder's and LM head's fp32 weights (and the
KV cache) per generated token at the measured streaming read bandwidth (a jitted sum over
256 MB). A batch-8 decode step is a matrix-vector product bound by those reads, so the
floor bounds the rollout ratio any implementation can reach here at fp32. A second bound,
the ceiling with XLA:CPU's own dot kernels, follows it: the measured prefill plus, per
token, the decode step's weight products alone (`weights_only_step`: the same matrix-vector
products at the same batch, chained in one jit, nothing else), which run well below the
streaming bandwidth.

Next to each training step's fraction of matmul peak the table gives transformers' (the
same analytic FLOPs over its time and torch's peak) and the fraction atlas_jax would need
to reach the goal's ratio: with both sides' matmul peaks equal, a ratio goal is a
fraction-of-peak goal.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch

from atlas_jax import aot, hf, random_checkpoint
from atlas_jax import sampler as sampler_lib
from atlas_jax.config import base_config
from atlas_jax.model import rope
from atlas_jax.rl.update import rl_update_fn
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import setup
from atlas_jax.run.state import TrainState
from atlas_jax.sft.update import sft_step_fn
from launch import bench_rl, cli

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["small", "wide"], "Model sizes from MODELS.")
flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("prompt_text", 48, "Text tokens per prompt (plus the image's).")
flags.DEFINE_integer("image_side", 8, "Image side in patches (14 px); tokens = side^2 / 4.")
flags.DEFINE_integer("new_tokens", 64, "Greedy tokens generated per row (no early stop).")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the median is reported).")
flags.DEFINE_list("steps", ["rollout", "sft", "la-grpo"], "What to time (also: rl-shared, "
                  "the image-heavy RL rows of launch/bench_rl.py: --batch prompts, "
                  "--group_size completions each).")
flags.DEFINE_integer("group_size", 8, "rl-shared: completions per prompt (G).")
flags.DEFINE_list("decode_lengths", [], "Also time atlas_jax decode ms/token at these cache "
                  "lengths (prompt + new tokens), e.g. 128,512,2048.")
flags.DEFINE_string("attention_impl", "xla", "atlas_jax model.attention_impl (auto: by "
                    "the device's platform).")
flags.DEFINE_string("remat", "none", "atlas_jax model.remat.")
flags.DEFINE_string("hf_dir", "", "Where to save the HF models (default: a temp dir).")
flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"], "Where transformers runs (cuda: on "
                  "the GPU JAX uses, for a same-device comparison).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides "
                  "(weights stay float32: transformers under autocast, atlas_jax's "
                  "model.dtype); the greedy tokens must agree only in float32.")

VOCAB = 8192
# Shapes in `random_checkpoint.hf_config`'s terms (the vocab is VOCAB).
MODELS = {
    "small": dict(text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=1408),
                  vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512)),
    "wide": dict(text=dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=4, intermediate_size=2816),
                 vision=dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=512)),
    # A GPU's size: ~1.1B parameters with Qwen's 151,936-token vocabulary (the LM head is
    # a sixth of the matmuls), for --torch_device=cuda --dtype=bfloat16 --batch=16.
    "gpu": dict(text=dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12,
                          num_key_value_heads=2, intermediate_size=8960, vocab_size=151936),
                vision=dict(depth=4, hidden_size=1280, num_heads=16, intermediate_size=3420)),
    # The test suite's smoke size (tests/test_bench.py), not a benchmark.
    "tiny": dict(text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128),
                 vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64)),
}
IMAGE, VIDEO, V_START, V_END = 8000, 8001, 8002, 8003
# Never generated (both sides): a sampled image token in the completion would make the
# training rows' image tokens outnumber the image's features.
VISION_IDS = (IMAGE, VIDEO, V_START, V_END)


def write_model(spec: dict, path: str):
  """A random transformers model of `spec` (sdpa attention), saved to `path`."""
  config = random_checkpoint.hf_config(
      dict({"vocab_size": VOCAB}, **spec["text"]), spec["vision"], image_token_id=IMAGE,
      video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)
  return random_checkpoint.write(path, config, attn_implementation="sdpa")


def make_batch(rng, batch: int, text: int, side: int, patch_dim: int):
  """Equal-length prompts: `text` random tokens around one side x side-patch image."""
  units = side * side // 4
  rows = []
  for _ in range(batch):
    words = rng.integers(3, 7900, text).tolist()
    rows.append(words[: text // 2] + [V_START] + [IMAGE] * units + [V_END] + words[text // 2:])
  ids = np.asarray(rows, np.int64)
  pixels = rng.normal(size=(batch, side * side, patch_dim)).astype(np.float32)
  grid = np.tile(np.asarray([[[1, side, side]]], np.int64), (batch, 1, 1))
  return ids, np.ones_like(ids), pixels, grid


def _sync():
  """Waits for torch's queued GPU work (a no-op on the CPU)."""
  if FLAGS.torch_device == "cuda":
    torch.cuda.synchronize()


def _autocast():
  """transformers' compute dtype: bf16 autocast over fp32 weights, or nothing for fp32."""
  return torch.autocast(FLAGS.torch_device, dtype=torch.bfloat16,
                        enabled=FLAGS.dtype == "bfloat16")


def timed(fn, repeats: int):
  """(first call seconds, median of `repeats` further calls); fn blocks until done."""
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times), out


def matmul_side() -> int:
  """The side of the square matmul whose GFLOP/s is each side's peak here."""
  return 8192 if FLAGS.torch_device == "cuda" else 2048


def matmul_peak() -> tuple[float, float]:
  """GFLOP/s of a square matmul (`matmul_side`) in --dtype, jnp and torch on their devices."""
  n = matmul_side()
  a = jnp.ones((n, n), FLAGS.dtype)
  f = jax.jit(lambda x: x @ x)
  _, jt, _ = timed(lambda: f(a).block_until_ready(), 5)
  ta = torch.ones(n, n, dtype=getattr(torch, FLAGS.dtype), device=FLAGS.torch_device)
  _, tt, _ = timed(lambda: (ta @ ta, _sync()), 5)
  return 2 * n**3 / jt / 1e9, 2 * n**3 / tt / 1e9


def stream_bandwidth() -> float:
  """GB/s of a jitted fp32 sum over 256 MB (a streaming read, the best case for weights)."""
  x = jnp.ones((64 * 2**20,), jnp.float32)
  f = jax.jit(jnp.sum)
  _, t, _ = timed(lambda: f(x).block_until_ready(), 5)
  return x.size * 4 / t / 1e9


def _text_layer_shapes(t) -> list[tuple[int, int]]:
  """[in, out] of one text decoder layer's matmul weights: q, k, v, o, gate, up, down."""
  d, q, kv, f = (t.hidden_size, t.num_attention_heads * t.head_dim,
                 t.num_key_value_heads * t.head_dim, t.intermediate_size)
  return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def rollout_floor(config, rows: int, prompt: int, new: int, patches: int, peak: float,
                  bandwidth: float) -> tuple[float, float, float]:
  """(prefill s, ms per decode step, total s): the prefill's FLOPs at `peak` GFLOP/s, then
  per token the text weights, the LM head and the average KV cache read at `bandwidth`."""
  t = config.text
  weights = aot.param_counts(config)[0]  # the decoder's and the LM head's
  cache = (2 * t.num_hidden_layers * rows * t.num_key_value_heads * t.head_dim
           * (prompt + new / 2))
  step = 4 * (weights + cache) / (bandwidth * 1e9)
  prefill = aot.model_flops(config, "prefill", rows=rows, length=prompt, patches=patches,
                            dense_attention=True) / (peak * 1e9)
  return prefill, step * 1e3, prefill + (new - 1) * step


def weights_only_step(config, rows: int, repeats: int) -> float:
  """Seconds of a decode step's weight products alone, as XLA:CPU runs them: per layer
  the q, k, v, o and SwiGLU matrix-vector products of `rows` rows (random fp32 weights of
  the decoder's shapes), then the LM head, jitted as one chain (no attention, norms,
  cache or sampling). The ceiling of any decode step built from XLA's own dot kernels."""
  t = config.text
  shapes = _text_layer_shapes(t)
  (d, q), (_, kv) = shapes[:2]
  keys = iter(jax.random.split(jax.random.key(0), t.num_hidden_layers * len(shapes) + 1))
  weight = lambda shape: jax.random.normal(next(keys), shape, jnp.float32) / shape[0] ** 0.5
  layers = [[weight(shape) for shape in shapes] for _ in range(t.num_hidden_layers)]
  head = weight((d, t.vocab_size))

  @jax.jit
  def step(x, layers, head):
    for wq, wk, wv, wo, gate, up, down in layers:
      attn = x @ wq + jnp.tile(x @ wk + x @ wv, q // kv)  # the k, v products, consumed
      x = x + attn @ wo
      x = x + (jax.nn.silu(x @ gate) * (x @ up)) @ down
    return x @ head

  x = jnp.ones((rows, d), jnp.float32)
  _, seconds, _ = timed(lambda: step(x, layers, head).block_until_ready(), repeats)
  return seconds


@dataclasses.dataclass
class Row:
  model: str
  step: str
  hf_tok_s: float
  jax_tok_s: float
  hf_first_s: float
  jax_compile_s: float
  goal: float
  peak_frac: float = 0.0
  hf_peak_frac: float = 0.0  # transformers' step: the same analytic FLOPs over torch's peak

  @property
  def ratio(self) -> float:
    return self.jax_tok_s / self.hf_tok_s


def bench_model(name: str, spec: dict, peak: float, peak_torch: float, out_dir: str,
                bandwidth: float) -> list[Row]:
  model = write_model(spec, os.path.join(out_dir, name)).to(FLAGS.torch_device)
  text, vision = spec["text"], spec["vision"]
  n_params = sum(p.numel() for p in model.parameters())
  print(f"\n== {name}: {n_params / 1e6:.1f}M params, text {text['hidden_size']} x "
        f"{text['num_hidden_layers']} layers, GQA {text['num_attention_heads']}/"
        f"{text['num_key_value_heads']}, vocab {text.get('vocab_size', VOCAB)}; vision {vision['depth']} x "
        f"{vision['hidden_size']}", flush=True)

  # A run's config on one device: its optimizer and steps, the flags' model options.
  c = base_config()
  c.model.remat, c.model.attention_impl = FLAGS.remat, FLAGS.attention_impl
  c.model.dtype = FLAGS.dtype
  c.data.batch_size = FLAGS.batch
  c.rl.alpha = 0.1  # LA-GRPO: the anchor on
  mesh = setup.make_mesh(c, jax.devices()[:1])
  config, params = hf.load(os.path.join(out_dir, name), dtype="float32")
  config = config.replace(**setup.runtime_options(c, mesh.devices.flat[0].platform))

  rng = np.random.default_rng(0)
  b, n = FLAGS.batch, FLAGS.new_tokens
  ids, mask, pixels, grid = make_batch(rng, b, FLAGS.prompt_text, FLAGS.image_side,
                                       config.vision.patch_dim)
  t_prompt, patches = ids.shape[1], pixels.shape[1]
  on_device = lambda x: torch.from_numpy(x).to(FLAGS.torch_device)
  mm = lambda x: on_device((x == IMAGE).astype(np.int64))
  hf_inputs = dict(pixel_values=on_device(pixels.reshape(-1, pixels.shape[-1])),
                   image_grid_thw=on_device(grid.reshape(-1, 3)))
  rows: list[Row] = []

  # Rollout: greedy, no early stop.
  model.eval()
  model.generation_config.eos_token_id = None
  def gen():
    with _autocast():
      out = model.generate(input_ids=on_device(ids), attention_mask=on_device(mask),
                           mm_token_type_ids=mm(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=2, suppress_tokens=list(VISION_IDS),
                           **hf_inputs)
    _sync()
    return out
  with torch.no_grad():
    hf_first, hf_t, hf_out = timed(gen, FLAGS.repeats)
  want = hf_out[:, t_prompt:].cpu().numpy()
  settings = sampler_lib.SamplerSettings(max_new_tokens=n, greedy=True, stop_ids=(), pad_id=2)
  allowed = np.ones(config.text.vocab_size, bool)
  allowed[list(VISION_IDS)] = False
  sampler = sampler_lib.Sampler(config, settings, allowed)
  batch = dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, jnp.int32),
               pixel_values=jnp.asarray(pixels), image_grid_thw=jnp.asarray(grid, jnp.int32))
  key = jax.random.key(0)
  sample = lambda: jax.block_until_ready(sampler.sample(params, batch, key))
  jax_first, jax_t, got = timed(sample, FLAGS.repeats)
  got = np.asarray(got["tokens"])
  same_rows = int((got == want).all(1).sum())
  same_tokens = float((got == want).mean())
  print(f"rollout: greedy tokens equal in {same_rows}/{b} rows ({same_tokens:.1%} of tokens)")
  prefill, step_ms, floor = rollout_floor(config, b, t_prompt, n, patches, peak, bandwidth)
  print(f"rollout floor here: prefill {prefill:.2f} s at the matmul peak + {n - 1} steps x "
        f"{step_ms:.1f} ms (weights and cache read once per token at {bandwidth:.1f} GB/s) = "
        f"{floor:.2f} s, i.e. at most {b * n / floor:.0f} new tok/s = "
        f"{hf_t / floor:.2f}x transformers; measured {jax_t:.2f} s")
  prefill_s = timed(lambda: jax.block_until_ready(sampler_lib.jit_prefill(
      config, params, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
      batch["image_grid_thw"], key, sampler.allowed, settings=settings)), FLAGS.repeats)[1]
  products = weights_only_step(config, b, max(FLAGS.repeats, 5))
  ceiling = prefill_s + (n - 1) * products
  weight_bytes = 4 * aot.param_counts(config)[0]
  print(f"rollout ceiling with XLA:CPU's dot kernels: prefill {prefill_s:.2f} s (measured) + "
        f"{n - 1} steps x {products * 1e3:.1f} ms (the step's weight products alone, "
        f"{weight_bytes / products / 1e9:.1f} GB/s) = {ceiling:.2f} s, i.e. at most "
        f"{hf_t / ceiling:.2f}x transformers; atlas_jax's decode steps: "
        f"{(jax_t - prefill_s) / (n - 1) * 1e3:.1f} ms")
  if "rollout" in FLAGS.steps:
    rows.append(Row(name, "rollout (new tok/s)", b * n / hf_t, b * n / jax_t, hf_first,
                    jax_first, 3.0))
  if FLAGS.dtype == "float32":  # bf16 rounding lets greedy paths part
    assert same_rows == b, "greedy tokens differ from transformers'"

  # Training rows: prompt + the greedy completion.
  full = np.concatenate([ids, want], axis=1)
  full_mask = np.ones_like(full)
  t_full = full.shape[1]
  flops = lambda step, **kw: aot.model_flops(config, step, rows=b, length=t_full,
                                             patches=patches, dense_attention=True, **kw)
  optim = setup.resolve_optim(c)
  optimizer = optimizer_lib.make_optimizer(optim)
  torch_opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                                eps=optim.eps, weight_decay=optim.weight_decay,
                                fused=FLAGS.torch_device == "cuda")
  labels = on_device(np.where(np.arange(t_full)[None] >= t_prompt, full, -100))

  def torch_step(window: bool = False):
    """SFT: the loss over every position's logits. window: the LM head only on the
    completion's positions (`logits_to_keep`, as TRL's GRPO trainer computes them)."""
    torch_opt.zero_grad(set_to_none=True)
    inputs = dict(input_ids=on_device(full), attention_mask=on_device(full_mask),
                  mm_token_type_ids=mm(full), **hf_inputs)
    with _autocast():
      if window:
        logits = model(**inputs, logits_to_keep=n + 1).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 on_device(full[:, -n:]).reshape(-1))
      else:
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
    torch_opt.step()
    _sync()
    return loss

  model.train()
  hf_first, hf_t, _ = timed(torch_step, FLAGS.repeats)
  hf_tok_s = b * t_full / hf_t

  pos, _ = rope.get_rope_index(full, full_mask, grid.reshape(-1, 3), image_token_id=IMAGE,
                               spatial_merge_size=2, xp=np)
  common = dict(input_ids=jnp.asarray(full, jnp.int32),
                attention_mask=jnp.asarray(full_mask, jnp.int32),
                pixel_values=jnp.asarray(pixels), image_grid_thw=jnp.asarray(grid, jnp.int32))
  completion = jnp.asarray(np.arange(t_full)[None] >= t_prompt, jnp.int32).repeat(b, 0)
  functional_ids = jnp.asarray([7000, 7001], jnp.int32)
  _, state_sh = setup.abstract_state(mesh, config, optimizer, params, c.seed)
  new_state = jax.jit(lambda p: TrainState.create(p, optimizer, c.seed), out_shardings=state_sh)

  def time_step(step, step_batch):
    """(compile s, median step s) of a jitted training step from a fresh state."""
    holder = [new_state(jax.tree.map(jnp.copy, params))]

    def once():
      holder[0], metrics = step(holder[0], step_batch)
      jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    compiled = step.lower(holder[0], step_batch).compile()
    compile_s = time.perf_counter() - t0
    del compiled
    _, t, _ = timed(once, FLAGS.repeats)
    return compile_s, t

  if "sft" in FLAGS.steps:
    sft_batch = dict(common, loss_mask=completion, valid=jnp.ones((b,), jnp.int32),
                     position_ids=jnp.asarray(np.transpose(pos, (1, 0, 2)), jnp.int32))
    c.train.logprob_chunk = t_full  # every position's log-prob in one chunk
    compile_s, t = time_step(sft_step_fn(c, config, mesh, optimizer, state_sh, functional_ids),
                             sft_batch)
    sft_flops = flops("sft")
    rows.append(Row(name, "SFT step (tok/s)", hf_tok_s, b * t_full / t, hf_first, compile_s,
                    1.2, sft_flops / t / 1e9 / peak, sft_flops / hf_t / 1e9 / peak_torch))
  if "la-grpo" in FLAGS.steps:
    logp = jnp.asarray(rng.normal(size=(b, t_full)) * 0.1 - 3.0, jnp.float32)
    rl_batch = dict(common, completion_mask=completion, old_logp=logp, sampler_logp=logp,
                    advantages=jnp.asarray(rng.normal(size=(b,)), jnp.float32))
    hf_rl_first, hf_rl_t, _ = timed(lambda: torch_step(window=True), FLAGS.repeats)
    c.train.logprob_chunk = c.rl.max_new_tokens = n  # the completion's log-probs, one chunk
    compile_s, t = time_step(rl_update_fn(c, config, mesh, optimizer, state_sh,
                                          functional_ids), rl_batch)
    rl_flops = flops("la-grpo", logit_positions=n)
    rows.append(Row(name, "LA-GRPO update (tok/s)", b * t_full / hf_rl_t, b * t_full / t,
                    hf_rl_first, compile_s, 1.2, rl_flops / t / 1e9 / peak,
                    rl_flops / hf_rl_t / 1e9 / peak_torch))
  if "rl-shared" in FLAGS.steps:
    seconds = bench_rl.measure(model, config, params, c, mesh, optimizer, state_sh, batch,
                               group_size=FLAGS.group_size, new_tokens=n,
                               repeats=FLAGS.repeats, device=FLAGS.torch_device,
                               autocast=_autocast, sync=_sync)
    drifts = bench_rl.drift(config, params, c, batch, FLAGS.group_size, n)
    print(bench_rl.format_rows(name, batch, FLAGS.group_size, n, seconds, drifts), flush=True)
  if FLAGS.decode_lengths:
    decode_vs_length(config, params, batch, [int(s) for s in FLAGS.decode_lengths])
  return rows


def decode_vs_length(config, params, batch, lengths):
  """atlas_jax decode ms per step at several cache lengths S (prompt + new tokens): the
  cache update should not grow with S; only attention's reads of the cache do."""
  t = batch["input_ids"].shape[1]
  print("decode (atlas_jax): cache length S -> ms per step for all rows "
        "(32 steps timed after prefill)")
  for s in lengths:
    n = s - t
    settings = sampler_lib.SamplerSettings(max_new_tokens=n, greedy=True, stop_ids=(), pad_id=2)
    allowed = jax.numpy.ones(config.text.vocab_size, bool)
    state = sampler_lib.jit_prefill(config, params, batch["input_ids"], batch["attention_mask"],
                                     batch["pixel_values"], batch["image_grid_thw"],
                                     jax.random.key(0), allowed, settings=settings)
    # Time 32 steps by starting the loop 32 steps before its end.
    start = max(n - 32, 1)
    run = lambda st: jax.block_until_ready(sampler_lib.jit_decode(
        config, params, st, allowed, settings=settings))
    fresh = lambda: jax.tree.map(lambda x: x.copy(), state.replace(
        step=jax.numpy.asarray(start, jax.numpy.int32)))
    run(fresh())  # compile
    times = []
    for _ in range(FLAGS.repeats):
      st = fresh()
      jax.block_until_ready(st)
      t0 = time.perf_counter()
      run(st)
      times.append(time.perf_counter() - t0)
    print(f"  S={s:>6}: {statistics.median(times) / (n - start) * 1e3:8.2f} ms/step")


def format_rows(rows: list[Row], peak_jax: float, peak_torch: float) -> str:
  head = ("| model | step | transformers | atlas_jax | ratio | goal | torch first call s | "
          "jax compile s | % of matmul peak: atlas_jax / transformers / the goal needs |")
  n = matmul_side()
  lines = [f"matmul peak ({FLAGS.dtype} {n}^2): jnp {peak_jax:.0f} GFLOP/s, torch "
           f"{peak_torch:.0f} GFLOP/s", head, "|" + "---|" * 9]
  for r in rows:
    frac = ""
    if r.peak_frac:  # the goal's time is transformers' / goal: its fraction scales likewise
      needed = r.peak_frac * r.goal / r.ratio
      frac = f"{r.peak_frac:.0%} / {r.hf_peak_frac:.0%} / {needed:.0%}"
    met = "met" if r.ratio >= r.goal else "not met"
    lines.append(f"| {r.model} | {r.step} | {r.hf_tok_s:.0f} | {r.jax_tok_s:.0f} | "
                 f"{r.ratio:.2f}x | >= {r.goal:g}x ({met}) | {r.hf_first_s:.2f} | "
                 f"{r.jax_compile_s:.2f} | {frac} |")
  return "\n".join(lines)


def main(argv):
  del argv
  torch.manual_seed(0)
  peak_jax, peak_torch = matmul_peak()
  bandwidth = stream_bandwidth()
  out_dir = FLAGS.hf_dir or tempfile.mkdtemp(prefix="atlas_bench_")
  rows = []
  for name in FLAGS.models:
    if name not in MODELS:
      raise ValueError(f"--models has {name!r}; expected names from {sorted(MODELS)}")
    rows += bench_model(name, MODELS[name], peak_jax, peak_torch, out_dir, bandwidth)
    print(format_rows(rows, peak_jax, peak_torch), flush=True)
  print("\n% of matmul peak: the step's analytic FLOPs / time / that side's matmul peak "
        "(atlas_jax's goal >= 60%); 'the goal needs': atlas_jax's fraction at the goal's "
        "ratio. transformers' torch step: fwd + bwd + AdamW on the same rows; for the update "
        "row with the LM head on the completion only (logits_to_keep), as atlas_jax's update "
        "computes it.")


if __name__ == "__main__":
  cli.run(main)
