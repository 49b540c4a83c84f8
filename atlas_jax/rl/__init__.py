"""RL: rewards, rollouts, the GRPO / LA-GRPO loss, the update step and its builders, the
loop (the sampler itself is `atlas_jax.sampler`)."""
