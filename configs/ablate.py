"""GRPO (alpha = 0) against LA-GRPO (pg and nll_pos anchors) from one SFT checkpoint, over
several seeds, on the synthetic suite (atlas_jax/ablate.py): held-out accuracy, reward and
its components, functional tokens per completion and their correctness, and the dilution
ratio, mean ± std.

Variants by argument:
  dense         the demo's suite: after SFT every completion has its one functional token.
  sparse        the regime LA-GRPO is for: SFT on a suite where a fifth of the
                trajectories keep a functional token (three in ten of those another
                family's) and two filler sentences lengthen every one, so the SFT model
                rarely uses a token, and then not always the right one (~70 tokens per
                completion with a token, ~350 per token).
  sparse_sweep  sparse with GRPO and the nll_pos anchor at alpha 0.02, 0.05, 0.1 and 0.3
                (in sparse's workdir it reuses sparse's SFT run and its alpha-0.1 runs).

  python -m launch.ablate --workdir=/tmp/atlas_ablate
  python -m launch.ablate --config=configs/ablate.py:sparse --workdir=/tmp/atlas_sparse
  python -m launch.ablate --config=configs/ablate.py:sparse_sweep --workdir=/tmp/atlas_sparse
  python -m launch.ablate --workdir=/tmp/atlas_ablate --config.ablate.seeds="(0, 1, 2, 3)"

The demo's recipe (configs/demo.py) with shorter stages: demo.sft is the one SFT run,
demo.rl every RL run (its steps are the RL steps), ablate.seeds the RL runs' config.seed,
ablate.alphas the LA-GRPO variants' anchor weights (a row per variant and alpha),
ablate.suite the synthetic suite's style (data.synthetic.SuiteStyle; the default is the
demo's suite).
"""

import ml_collections

from configs import demo

VARIANTS = ("dense", "sparse", "sparse_sweep")


def get_config(arg: str = "dense"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/ablate.py variant {arg!r} is not one of {VARIANTS}")
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
  c.ablate.alphas = (0.1,)  # the LA-GRPO variants' anchor weights (base config's rl.alpha)
  c.ablate.suite = ml_collections.ConfigDict(
      dict(token_rate=1.0, wrong_token_rate=0.0, filler_sentences=0))
  # sparse, measured the same way: SFT 426 s (0.47 s/step), held-out accuracy 0.33 (the
  # tiny model reads the images later on this suite: dense 0.60-0.67), no functional token in
  # greedy completions, 0.26 per sampled completion (72% the right one); an RL run ~85 s;
  # 22 minutes for the 1 + 3 x 3 runs, 13 more for the sweep's 9 new ones.
  if arg.startswith("sparse"):
    c.ablate.suite.token_rate = 0.2
    c.ablate.suite.wrong_token_rate = 0.3
    c.ablate.suite.filler_sentences = 2  # ~13 tokens each: trajectories of ~71 tokens
    c.data.max_length = 240  # rows of the sparse suite are up to ~200 tokens
    c.data.length_buckets = (192, 240)
    c.rl.max_new_tokens = 96  # the longest trajectory is ~81 tokens
    # RL moves more than the dense recipe's 15 steps at 2e-5: Adam changes each weight by
    # about lr per step, so those runs move a weight by at most 3e-4 in all, too little to
    # change how often a token the SFT model gives ~0.2 probability is sampled.
    c.demo.rl.steps = 20
    c.demo.rl.lr = 1e-4
  if arg == "sparse_sweep":
    c.ablate.variants = ("grpo", "la_grpo_nll_pos")
    # nll_pos at 0.1 in sparse: sampled functional tokens per completion 0.26 -> 2.0 in 20
    # steps (4.6 in one seed, whose held-out accuracy fell to 0); the sweep finds the onset.
    c.ablate.alphas = (0.02, 0.05, 0.1, 0.3)
  return c
