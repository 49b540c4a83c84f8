"""The image-heavy RL rows of `launch.bench` (`--steps=rl-shared`): a few long image prompts,
G short completions each, sampled by atlas_jax's sampler (temperature 1, no early stop);
the LA-GRPO update and the old-log-prob pass timed with each prompt computed once
(rl.shared_prefix) against the unshared rows (each prompt and image G times, today's
default) and transformers on the same weights and rows; and the sampler-vs-trainer drift
(mean |sampler log-prob - trainer log-prob| per completion token) in float32 and bfloat16
compute, shared and unshared.

  python -m launch.bench --models=small --steps=rl-shared --batch=1 --group_size=8 \
      --image_side=40 --prompt_text=48 --new_tokens=64

Letters: B prompts (--batch), G completions per prompt, N new tokens; R = B * G.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from atlas_jax import sampler as sampler_lib
from atlas_jax.rl import rollout
from atlas_jax.rl.update import old_logps_fn, rl_update_fn
from atlas_jax.run.state import TrainState


def _timed(fn, repeats: int):
  """(first call seconds, median of `repeats` further calls)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def sample(config, params, prompts: dict, group_size: int, new_tokens: int, seed: int = 0):
  """G completions of N tokens per prompt (temperature 1, no stop): tokens, mask, logps
  [R, N] as the rollout holds them."""
  settings = sampler_lib.SamplerSettings(max_new_tokens=new_tokens, temperature=1.0,
                                         samples_per_prompt=group_size, stop_ids=(), pad_id=2)
  allowed = np.ones(config.text.vocab_size, bool)
  allowed[[config.image_token_id, config.video_token_id, config.vision_start_token_id,
           config.vision_end_token_id]] = False
  out = sampler_lib.Sampler(config, settings, allowed).sample(params, prompts,
                                                              jax.random.key(seed))
  return jax.tree.map(jax.block_until_ready, out)


def batches(prompts: dict, completions: dict, group_size: int):
  """(unshared rows, grouped batch) of the same rollouts, advantages random."""
  rng = np.random.default_rng(0)
  adv = jnp.asarray(rng.normal(size=completions["tokens"].shape[0]), jnp.float32)
  return (rollout.assemble(prompts, completions, adv, group_size=group_size),
          rollout.assemble_grouped(prompts, completions, adv))


def drift(config, params, c, prompts, group_size: int, new_tokens: int) -> dict:
  """{(dtype, "shared" | "unshared"): mean |sampler - trainer| log-prob per completion
  token}, both passes in that compute dtype."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg = config.replace(dtype=dtype)
    completions = sample(cfg, params, prompts, group_size, new_tokens)
    flat, grouped = batches(prompts, completions, group_size)
    mask = np.asarray(completions["mask"], np.float32)
    sampler_logp = np.asarray(completions["logps"])
    t = prompts["input_ids"].shape[1]
    for shared, batch in ((False, flat), (True, grouped)):
      c.rl.shared_prefix = shared
      logp = np.asarray(old_logps_fn(c, cfg)(params, batch)[0])
      if not shared:
        logp = logp[:, t - 1:t - 1 + new_tokens]
      out[dtype, "shared" if shared else "unshared"] = float(
          np.sum(np.abs(logp - sampler_logp) * mask) / max(mask.sum(), 1))
  return out


def measure(model, config, params, c, mesh, optimizer, state_sh, prompts: dict, *,
            group_size: int, new_tokens: int, repeats: int, device: str, autocast, sync):
  """Seconds of the update and the old-logp pass: {pass: {"transformers", "unshared",
  "shared"}: (first call or compile s, median s)} on B prompts x G sampled completions.
  model: the transformers model on `device`; autocast / sync: the bench's."""
  n, g = new_tokens, group_size
  c.train.logprob_chunk = c.rl.max_new_tokens = n
  c.rl.group_size = g
  completions = sample(config, params, prompts, g, n)
  flat, grouped = batches(prompts, completions, g)
  functional_ids = jnp.asarray([7000, 7001], jnp.int32)
  new_state = jax.jit(lambda p: TrainState.create(p, optimizer, c.seed), out_shardings=state_sh)
  out = {"update": {}, "old-logp": {}}
  for shared, batch in ((False, flat), (True, grouped)):
    name = "shared" if shared else "unshared"
    c.rl.shared_prefix = shared
    logps = old_logps_fn(c, config)
    t0 = time.perf_counter()
    logps.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    out["old-logp"][name] = (compile_s, _timed(
        lambda: jax.block_until_ready(logps(params, batch)), repeats)[1])
    batch = dict(batch, old_logp=logps(params, batch)[0])
    update = rl_update_fn(c, config, mesh, optimizer, state_sh, functional_ids)
    holder = [new_state(jax.tree.map(jnp.copy, params))]
    t0 = time.perf_counter()
    update.lower(holder[0], batch).compile()
    compile_s = time.perf_counter() - t0

    def once():
      holder[0], metrics = update(holder[0], batch)
      jax.block_until_ready(metrics)
    out["update"][name] = (compile_s, _timed(once, repeats)[1])

  # transformers: the unshared rows (it has no other form), the LM head on the completion
  # only (logits_to_keep, as TRL's GRPO trainer).
  on_device = lambda x: torch.from_numpy(np.asarray(x, np.int64)).to(device)
  ids, mask = np.asarray(flat["input_ids"]), np.asarray(flat["attention_mask"])
  px = np.repeat(np.asarray(prompts["pixel_values"]), g, axis=0)
  grid = np.repeat(np.asarray(prompts["image_grid_thw"]), g, axis=0)
  inputs = dict(input_ids=on_device(ids), attention_mask=on_device(mask),
                mm_token_type_ids=on_device(ids == config.image_token_id),
                pixel_values=torch.from_numpy(px.reshape(-1, px.shape[-1])).to(device),
                image_grid_thw=on_device(grid.reshape(-1, 3)))
  targets = on_device(ids[:, -n:])
  optim = torch.optim.AdamW(model.parameters(), lr=1e-6)

  def completion_logps():
    with autocast():
      logits = model(**inputs, logits_to_keep=n + 1).logits[:, :-1].float()
    return torch.gather(torch.log_softmax(logits, -1), -1, targets[..., None])[..., 0]

  def torch_update():
    optim.zero_grad(set_to_none=True)
    (-completion_logps().mean()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    sync()

  def torch_old_logp():
    with torch.no_grad():
      completion_logps()
    sync()
  model.train()
  out["update"]["transformers"] = _timed(torch_update, repeats)
  out["old-logp"]["transformers"] = _timed(torch_old_logp, repeats)
  return out


def format_rows(name: str, prompts: dict, group_size: int, new_tokens: int, seconds: dict,
                drifts: dict | None) -> str:
  """The rows as a markdown table (seconds, ratios, compile times) and the drift line."""
  b, t = prompts["input_ids"].shape
  patches = prompts["pixel_values"].shape[1]
  lines = [f"image-heavy RL ({name}): {b} prompt(s) of {t} tokens ({patches} patches), "
           f"G = {group_size}, {new_tokens} new tokens",
           "| model | pass | transformers s | unshared s | shared s | shared vs unshared | "
           "shared vs transformers | compile s: unshared / shared |", "|" + "---|" * 8]
  for step, s in seconds.items():
    hf, un, sh = s["transformers"][1], s["unshared"][1], s["shared"][1]
    goal = " (goal >= 2.5x)" if step == "update" else ""
    lines.append(f"| {name} | {step} | {hf:.3f} | {un:.3f} | {sh:.3f} | {un / sh:.2f}x{goal} "
                 f"| {hf / sh:.2f}x | {s['unshared'][0]:.1f} / {s['shared'][0]:.1f} |")
  if drifts:
    lines.append("sampler vs trainer drift (mean |log-prob difference| per completion "
                 "token): " + ", ".join(f"{d} {k} {v:.2e}" for (d, k), v in drifts.items()))
  return "\n".join(lines)
