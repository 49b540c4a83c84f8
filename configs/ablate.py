"""GRPO (alpha = 0) against LA-GRPO (pg and nll_pos anchors) from one SFT checkpoint, over
several seeds, on the synthetic suite (atlas_jax/ablate.py): held-out accuracy, reward and
its components, functional tokens per completion and the dilution ratio, mean ± std.

  python -m launch.ablate --workdir=/tmp/atlas_ablate
  python -m launch.ablate --workdir=/tmp/atlas_ablate --config.ablate.seeds="(0, 1, 2, 3)"

The demo's recipe (configs/demo.py) with shorter stages: demo.sft is the one SFT run,
demo.rl every RL run (its steps are the RL steps), ablate.seeds the RL runs' config.seed.
"""

import ml_collections

from configs import demo


def get_config():
  c = demo.get_config()
  c.recipe = "ablate"
  # SFT: the demo's stage as it is (900 steps, 0.65 held-out accuracy). RL: 15 steps of 4
  # prompts x 8 samples (the demo: 30 of 8 x 8), every step logged. Measured under nice with
  # the machine's 2 cores shared (load ~8): SFT ~0.5 s/step, an RL step ~3.3 s, a run's
  # setup + held-out evaluation ~20 s, a variant's first compile ~20 s more: ~20 minutes for
  # the 1 + 3 x 3 runs.
  c.demo.rl.steps = 15
  c.demo.rl.log_every = 1
  c.rl.prompts_per_step = 4
  c.rl.eval_prompts = 100  # the whole held-out split (5 families x 20)
  c.ablate = ml_collections.ConfigDict()
  c.ablate.seeds = (0, 1, 2)
  c.ablate.variants = ("grpo", "la_grpo_pg", "la_grpo_nll_pos")
  c.ablate.alpha = 0.1  # the LA-GRPO variants' anchor weight (base config's rl.alpha)
  return c
