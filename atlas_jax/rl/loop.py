"""The RL loop: rollout -> reward -> LA-GRPO update, resumable from its workdir like SFT.

Start: params from an orbax SFT checkpoint (config.model.init_checkpoint), else from
config.model.hf_path or a fresh init. Each step samples G completions for each of B
prompts with the current params, scores them on the host, computes group advantages,
takes the trainer's log-probs once (the "old" policy for the mu inner updates, and the
reference for the sampler-vs-trainer drift metric), then applies mu updates. With
optim.grad_accum = k > 1 the rollout batch is split into k micro-batches
(`update.micro_batches`) and each update accumulates their gradients (optax.MultiSteps):
k micro-steps of state.step per update, so train.steps counts micro-steps as in SFT. With
rl.dynamic_sampling (DAPO) groups whose rewards are all equal are dropped and further
prompt batches drawn until B informative groups are in hand (`rollout.dynamic_sampling`);
rl.overlong_buffer adds DAPO's soft overlong penalty to the rewards. Either way a step's
sampling and scoring give one `rollout.Rollouts`. Every metric the update returns is
logged, the gradient-dilution diagnostic included. The log-prob passes take the rollout batch in
rl.logprob_micro_batches micro-batches of their own (`update.batch_logps`). With
rl.shared_prefix the rollout batch is grouped (`rollout.assemble_grouped`): the log-prob
passes and the update run each prompt once for its G completions (`run.shared_prefix`),
micro-batches holding whole groups; the update's groups are first split into
rl.shared_prefix_parts (`rollout.split_groups`), each with its own copy of the prompt.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import config as config_lib
from atlas_jax import multihost, sharding
from atlas_jax.data import pipeline
from atlas_jax.eval import in_training
from atlas_jax.functional_tokens import TASK_TOKENS
from atlas_jax.rl import grpo, rollout
from atlas_jax.rl import rewards as rewards_lib
from atlas_jax.rl.update import batch_logps, micro_batches, old_logps_fn, rl_update_fn
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import plots, setup
from atlas_jax.run.steps import StepCache
from atlas_jax.sampler import SamplerSettings, decode_completions, make_sampler


def _per_process(name: str, global_count: int) -> int:
  """This process's share of a global prompt count (each process feeds its own rows)."""
  n = jax.process_count()
  if global_count % n:
    raise ValueError(f"config.{name} {global_count} is not divisible by the {n} processes")
  return global_count // n


def evaluate(run, params, source, rl, reward_cfg, *, max_prompts: int) -> dict:
  """Greedy rollouts on up to `max_prompts` prompts: accuracy, reward, functional tokens."""
  c = run.config
  opts = dict(setup.data_options(c, run.tokenizer, shuffle=False),
              batch_size=_per_process("rl.eval_batch_size", rl.eval_batch_size))
  iterator = pipeline.rl_pipeline(source, num_epochs=1, **opts)
  sampler = make_sampler(run.model_config, run.tokenizer,
                         SamplerSettings.from_rl(rl, greedy=True, samples_per_prompt=1))
  totals, comps, func, lengths, tasks, seen = [], {}, [], [], [], 0
  t0, generated = time.perf_counter(), 0
  with sharding.with_rules(run.mesh, sharding.RULES):
    for batch in iterator:
      if seen >= max_prompts:
        break
      out = sampler.sample(params, multihost.host_batch_to_device(batch, run.mesh),
                           jax.random.key(0))
      out = {k: multihost.local_rows(out[k]) for k in ("tokens", "mask")}
      texts = decode_completions(run.tokenizer, out["tokens"], out["mask"])
      samples = rollout.host_samples(batch, 1)
      total, parts = rewards_lib.compute_rewards(texts, samples, reward_cfg,
                                                 num_tokens=out["mask"].sum(1).tolist())
      keep = min(len(texts), max_prompts - seen)
      seen += keep
      totals.append(total[:keep])
      for k, v in parts.items():
        comps.setdefault(k, []).append(v[:keep])
      func.append(rollout.functional_counts(texts[:keep], run.table.tokens))
      tasks += [s.task or "" for s in samples[:keep]]
      lengths.append(out["mask"].sum(1)[:keep])
      if seen == keep:  # the first batch compiles; time the rest
        t0 = time.perf_counter()
      else:
        generated += int(out["mask"].sum())
  if multihost.global_mean(seen) == 0:
    raise ValueError("the evaluation split has no usable prompt "
                     f"({pipeline.report_skipped(iterator.skipped)})")
  elapsed = max(time.perf_counter() - t0, 1e-9)
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
  result = {"reward": multihost.global_mean(cat(totals)),
            "functional_per_completion": multihost.global_mean(cat(func)),
            "completion_length": multihost.global_mean(cat(lengths)),
            "prompts": multihost.global_mean(seen) * jax.process_count(),
            "rollout_tokens_per_s": multihost.global_mean(generated) * jax.process_count()
            / elapsed}
  result.update({k: multihost.global_mean(cat(v)) for k, v in sorted(comps.items())})
  if "accuracy" in comps:  # per task family (the same list on every process)
    acc, tasks = cat(comps["accuracy"]), np.asarray(tasks)
    for t in sorted(TASK_TOKENS):
      value = multihost.global_mean(acc[tasks == t])
      if not np.isnan(value):
        result[f"accuracy/{t}"] = value
  return result


def evaluate_held_out(run, params, c) -> dict:
  """`evaluate` on the run's held-out ("test") split: rl.eval_prompts prompts, rewards by
  config.rl.reward."""
  source = pipeline.open_source(run.data_report, "test")
  return evaluate(run, params, source, c.rl, c.rl.reward, max_prompts=c.rl.eval_prompts)


@jax.jit
def _logp_drift(batch):
  """Mean |trainer - sampler| log-prob over completion tokens (prediction layout, or the
  grouped batch's completion layout)."""
  if "prompt_ids" in batch:  # grouped: entry i is completion token i
    pred_mask = batch["completion_mask"]
    drift = jnp.abs(batch["old_logp"] - batch["sampler_logp"])
  else:
    pred_mask = batch["completion_mask"][:, 1:]  # position j predicts token j + 1
    drift = jnp.abs(batch["old_logp"][:, :-1] - batch["sampler_logp"][:, :-1])
  return jnp.sum(drift * pred_mask) / jnp.maximum(jnp.sum(pred_mask), 1)


def train_rl(c, workdir: str, cache: StepCache | None = None):
  """Runs (or resumes) LA-GRPO in `workdir`; `cache` shares built steps between runs in one
  process. Returns (final TrainState, last metrics, Run)."""
  config_lib.validate(c)
  rl = c.rl
  per_rollout = rl.inner_updates * c.optim.grad_accum  # optimizer micro-steps per rollout
  evals = in_training.TrainingEval.create(c)  # config.eval; None when off
  run, params = setup.start(c, workdir, c.train.steps)
  ref_params = jax.tree.map(jnp.copy, params) if rl.beta > 0 else None
  optim = setup.resolve_optim(c)
  optimizer = optimizer_lib.make_optimizer(optim)
  schedule = optimizer_lib.learning_rate_schedule(optim)
  state, state_sh = setup.create_state(run, params, optimizer)
  source = pipeline.open_source(run.data_report, "train")
  batch_size = _per_process("rl.prompts_per_step", rl.prompts_per_step)
  iterator = pipeline.rl_pipeline(source, **dict(setup.data_options(c, run.tokenizer),
                                                 batch_size=batch_size))
  state = setup.maybe_restore(run, state, state_sh, iterator)
  sampler = make_sampler(run.model_config, run.tokenizer, SamplerSettings.from_rl(rl))
  functional_ids = jnp.asarray(run.table.id_array)
  old_logps = old_logps_fn(c, run.model_config, cache=cache)
  logp_count = config_lib.logprob_micro_batches(c)
  update = rl_update_fn(c, run.model_config, run.mesh, optimizer, state_sh, functional_ids,
                        cache=cache)

  last: dict = {}
  start_step = int(state.step)
  end = setup.stop_step(c, start_step)
  for step in range(start_step // per_rollout, end // per_rollout):
    t0 = time.perf_counter()
    key = jax.random.fold_in(state.step_key(), 1)
    draw = lambda i: rollout.sample_and_score(  # draw i of this step
        run, rl, sampler, iterator, state.params, key if i == 0 else jax.random.fold_in(key, i))
    if rl.dynamic_sampling:
      rollouts = rollout.dynamic_sampling(
          draw, groups_needed=batch_size, group_size=rl.group_size,
          max_draws=rl.dynamic_sampling_max_draws, mesh=run.mesh,
          pad_id=run.tokenizer.pad_token_id)
    else:
      rollouts = draw(0)
    advantages = grpo.group_advantages(rollouts.reward, rl.group_size,
                                       scale_by_std=rl.scale_adv_by_std, std=rl.adv_std)
    advantages = multihost.to_global_rows(np.asarray(advantages), run.mesh)
    if rl.shared_prefix:  # each prompt once for the log-prob passes
      batch = rollout.assemble_grouped(rollouts.prompts, rollouts.completions, advantages)
    else:
      batch = rollout.assemble(rollouts.prompts, rollouts.completions, advantages,
                               group_size=rl.group_size)
    with sharding.with_rules(run.mesh, sharding.RULES):
      batch["old_logp"] = batch_logps(old_logps, state.params, batch, logp_count, run.mesh)
      if ref_params is not None:
        batch["ref_logp"] = batch_logps(old_logps, ref_params, batch, logp_count, run.mesh)
      if rl.shared_prefix:
        batch = rollout.split_groups(batch, rl.shared_prefix_parts)
      micro = micro_batches(batch, optim.grad_accum, run.mesh)
      updates = []
      for _ in range(rl.inner_updates):
        for mb in micro:
          state, metrics = update(state, mb)
          updates.append(metrics)
    metrics = {k: float(np.mean([float(u[k]) for u in updates])) for k in updates[0]}
    metrics.update(rollout.metrics(rollouts, run.table.tokens),
                   logp_drift=float(np.mean([float(_logp_drift(mb)) for mb in micro])),
                   step_seconds=time.perf_counter() - t0,
                   learning_rate=float(schedule(int(state.step) // optim.grad_accum)))
    done = int(state.step)
    if done % c.train.log_every < per_rollout or done >= end:
      run.writer.write(done, metrics, prefix="rl")
    last = metrics
    run.checkpointer.save(done, state, data_state=iterator.get_state(),
                          extra=setup.checkpoint_extra(run), force=done >= end)
    if evals is not None:
      evals.maybe_run(run, state, done, end, stride=per_rollout)
    if done % c.train.log_every < per_rollout or done >= end:
      plots.refresh(run.workdir, force=done >= end)
  run.checkpointer.wait()
  run.checkpointer.close()
  run.writer.close()
  return state, last, run
