"""The device check's same-device comparison (its `gpu_bench` stage): atlas_jax's `hf.load`
+ `model.forward` against transformers on one device, fp32 weights and bf16 compute, on a
random Qwen2.5-VL (`atlas_jax.random_checkpoint`): forward and train-step tok/s, their
ratio, TFLOP/s and MFU against the device's bf16 peak (FLOPs from `aot.model_flops`, dense
attention: the work an einsum does), peak memory and the logit gap. `--dry_run` runs it at
a tiny size on the CPU.
"""

from __future__ import annotations

import os
import time

from atlas_jax import aot, hf, random_checkpoint
from atlas_jax.model import config as model_config
from atlas_jax.model import forward

# gpu: ~1.1B parameters (text 1536 x 16 layers, GQA 12/2, Qwen's 151,936-token vocabulary,
# tied embeddings; vision 4 x 1280), 16 rows of 256 tokens with a 16x16-patch image each.
SPECS = dict(
    gpu=dict(hidden=1536, layers=16, heads=12, kv_heads=2, mlp=8960, vocab=151936, v_depth=4,
             v_hidden=1280, v_heads=16, v_mlp=3420, batch=16, text=190, side=16, repeats=3),
    dry=dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=512, v_depth=2,
             v_hidden=32, v_heads=2, v_mlp=64, batch=2, text=14, side=4, repeats=1))


def _hf_model(s: dict, device: str):
  """A random fp32 Qwen2.5-VL of spec `s` on `device` (`random_checkpoint`), and its image
  token id."""
  image = s["vocab"] - 4  # then video, vision start, vision end
  config = random_checkpoint.hf_config(
      dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
           num_key_value_heads=s["kv_heads"], tie_word_embeddings=True),
      dict(depth=s["v_depth"], hidden_size=s["v_hidden"], num_heads=s["v_heads"],
           intermediate_size=s["v_mlp"], window_size=112),
      image_token_id=image, video_token_id=image + 1, vision_start_token_id=image + 2,
      vision_end_token_id=image + 3)
  model = random_checkpoint.random_model(config, attn_implementation="sdpa", norm_noise=0)
  return model.to(device), image


def _median_s(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn` (which blocks) after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def run(out: dict, *, dry_run: bool, workdir: str, peak: float | None):
  """The stage's body (a generator: `out` holds the figures so far at each yield)."""
  import gc

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  s, device = SPECS["dry" if dry_run else "gpu"], "cpu" if dry_run else "cuda"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  n = 256 if dry_run else 8192
  a, ta = jnp.ones((n, n), jnp.bfloat16), torch.ones(n, n, dtype=torch.bfloat16, device=device)
  mm = jax.jit(lambda x: x @ x)
  tflops = lambda fn: float(f"{2 * n**3 / _median_s(fn, 5) / 1e12:.4g}")
  out.update(device_kind=jax.devices()[0].device_kind, bf16_peak_tflops=peak, spec=s,
             errors={}, matmul_bf16_tflops=dict(jax=tflops(lambda: mm(a).block_until_ready()),
                                                torch=tflops(lambda: (ta @ ta, sync()))))
  rng = np.random.default_rng(0)
  image, b, patches, half = s["vocab"] - 4, s["batch"], s["side"] ** 2, s["text"] // 2
  ids = np.asarray([[*w[:half], image + 2, *[image] * (patches // 4), image + 3, *w[half:]]
                    for w in rng.integers(3, image, (b, s["text"]))], np.int64)
  inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids),
                pixel_values=rng.normal(size=(b * patches, 1176)).astype(np.float32),
                image_grid_thw=np.tile(np.asarray([[1, s["side"], s["side"]]]), (b, 1)))
  path = os.path.join(workdir, "gpu_bench_hf")
  model, image = _hf_model(s, device)
  model.save_pretrained(path)
  flops = aot.model_flops(model_config.from_hf_dir(path), "prefill", rows=b,
                          length=ids.shape[1], patches=patches, dense_attention=True)
  out.update(tokens_per_batch=ids.size, forward_tflop=float(f"{flops / 1e12:.4g}"))

  def figures(seconds, step_flops, **extra):
    f = dict(seconds=float(f"{seconds:.4g}"), tok_s=float(f"{ids.size / seconds:.4g}"),
             tflops=float(f"{step_flops / seconds / 1e12:.4g}"), **extra)
    if peak:
      f["mfu"] = float(f"{step_flops / seconds / 1e12 / peak:.3g}")
    return f

  want = _torch_side(model, image, s, device, inputs, flops, figures, out)
  del model
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()  # the torch model is gone: its memory goes to JAX
  yield
  for impl in ("xla",) if dry_run else ("xla", "cudnn"):
    try:
      row = _jax_side(impl, s, path, inputs, flops, figures, want)
      for part in ("forward", "train_step"):
        row[part]["ratio"] = round(row[part]["tok_s"] / out["transformers"][part]["tok_s"], 3)
      out[f"atlas_jax_{impl}"] = row
    except Exception as e:  # noqa: BLE001  (recorded; the next implementation still runs)
      out["errors"][impl] = f"{type(e).__name__}: {str(e)[:1500]}"
    out["summary"] = _bench_summary(out)
    yield


def _bench_summary(out: dict) -> str:
  """'xla: forward 1.10x (MFU 40%), train_step 0.95x (MFU 35%); cudnn: ...'"""
  parts = []
  for key, row in out.items():
    if key.startswith("atlas_jax_"):
      cells = [f"{p} {row[p]['ratio']:.2f}x" + (f" (MFU {row[p]['mfu']:.0%})" if "mfu" in row[p]
                                                 else "") for p in ("forward", "train_step")]
      parts.append(f"{key[len('atlas_jax_'):]}: {', '.join(cells)}")
  return "; ".join(parts) or "no atlas_jax row"


def _torch_side(model, image, s, device, inputs, flops, figures, out):
  """transformers' forward and train step (fwd + bwd + AdamW) under bf16 autocast, fp32
  weights; returns the first two rows' logits."""
  import torch
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
  pt = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
  pt["mm_token_type_ids"] = (pt["input_ids"] == image).long()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

  def forward():
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
      logits = model(**pt).logits
    sync()
    return logits

  def train_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
      loss = model(**pt, labels=pt["input_ids"]).loss
    loss.backward()
    opt.step()
    sync()

  want = forward()[:2].float().cpu().numpy()
  out["transformers"] = dict(forward=figures(_median_s(forward, s["repeats"]), flops),
                             train_step=figures(_median_s(train_step, s["repeats"]), 3 * flops))
  if device == "cuda":
    out["transformers"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
  return want


def _jax_side(impl, s, path, inputs, flops, figures, want) -> dict:
  """atlas_jax's forward and train step (fwd + bwd + AdamW; fp32 weights, bf16 compute)
  with attention `impl`, on the checkpoint at `path`."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  config, params = hf.load(path, compute_dtype="bfloat16")
  config = dataclasses.replace(config, attention_impl=impl)
  batch = tuple(jnp.asarray(inputs[k], jnp.float32 if k == "pixel_values" else jnp.int32)
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"))
  t0 = time.perf_counter()
  fwd = jax.jit(forward, static_argnums=0).lower(config, params, *batch).compile()
  compile_s = round(time.perf_counter() - t0, 1)
  got = np.asarray(fwd(params, *batch)[:2])
  row = dict(forward=figures(_median_s(lambda: fwd(params, *batch).block_until_ready(),
                                       s["repeats"]), flops, compile_s=compile_s),
             logits_vs_transformers=dict(max_abs=float(np.abs(got - want).max()),
                                         scale=float(np.abs(want).max())))
  tx = optax.adamw(1e-5)

  def train_step(params, opt_state, batch):
    def loss_fn(params):
      logp = jax.nn.log_softmax(forward(config, params, *batch)[:, :-1], axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, batch[0][:, 1:, None], axis=-1))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]
  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state, batch).compile()
  compile_s = round(time.perf_counter() - t0, 1)

  def once():
    state[0], state[1], loss = step(*state, batch)
    loss.block_until_ready()

  row["train_step"] = figures(_median_s(once, s["repeats"]), 3 * flops, compile_s=compile_s)
  peak_bytes = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  if peak_bytes:  # the process's peak so far
    row["peak_memory_gib"] = round(peak_bytes / 2**30, 2)
  return row
