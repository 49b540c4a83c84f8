"""RL: the rollout sampler, rewards, GRPO / LA-GRPO losses, the update step and the loop."""
