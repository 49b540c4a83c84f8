"""Multi-image records end to end (data.max_images = 2): chat and RL files with two drawn
images per record through build + pipeline, then the training loss, the sampler and the
loops, each against transformers' Qwen2_5_VLForConditionalGeneration on the same tokens,
patches and grids.

The batches mix a two-image record with a one-image one, so collation pads a grid row
(zeros) and the flattened grids that M-RoPE and the vision tower read have a gap.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from atlas_jax import hf
from atlas_jax.data import chat, pipeline, tfds_builder
from atlas_jax.rl import rollout
from atlas_jax.run import logprobs
from atlas_jax.run import optimizer as optimizer_lib
from atlas_jax.run import setup as run_lib
from atlas_jax.run.logprobs import token_logps
from atlas_jax.run.state import TrainState
from atlas_jax.sampler import Sampler, SamplerSettings, allowed_ids
from atlas_jax.sft.update import sft_step
from configs import sft as sft_config
from tests import factories as F

PX = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 20)
MAX_PATCHES = 128   # the two-image record has 60 + 40 patches
BUCKETS = (128, 256)
CHUNK = 64
TOL = 1e-4


def _draw(path, height, width, color, seed):
  """A noisy background (so every patch differs) with a filled ellipse."""
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  ImageDraw.Draw(img).ellipse((4, 4, width - 4, height - 4), fill=color)
  img.save(path)
  return path.name


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _images(root):
  """a: grid (1, 6, 10); b: (1, 10, 4); c: (1, 4, 6) under PX."""
  return (_draw(root / "a.png", 84, 140, "red", 0), _draw(root / "b.png", 150, 56, "blue", 1),
          _draw(root / "c.png", 56, 84, "green", 2))


def _chat_rows(a, b, c):
  two = {"id": "two", "images": [a, b], "messages": [
      {"role": "user", "content": "Look <image> here."},
      {"role": "assistant", "content": "A red circle."},
      {"role": "user", "content": "<image>\nAnd this one?"},
      {"role": "assistant", "content": "The blue circle. \\boxed{blue}"}]}
  one = {"id": "one", "images": [c], "messages": [
      {"role": "user", "content": "<image>Which color?"},
      {"role": "assistant", "content": "Green. \\boxed{green}"}]}
  return [two, one]


def _rl_rows(a, b, c):
  return [{"id": "two", "problem": "Is <image> left of <image>?", "answer": "A",
           "images": [a, b]},
          {"id": "one", "problem": "<image>How many circles?", "answer": "1", "images": [c]}]


def _build(tmp, name, rows):
  report = tfds_builder.build_dataset(
      splits={"train": _write_jsonl(tmp / f"{name}.jsonl", rows)},
      data_dir=str(tmp / f"tfds_{name}"),
      options=tfds_builder.BuildOptions(max_images=2, max_patches=MAX_PATCHES, **PX))
  assert report["counts"] == {"train": 2}, report
  return tfds_builder.open_source(report, "train")


def _batch(make, source, tok, **kw):
  opts = dict(tokenizer=tok, seed=0, shuffle=False, num_epochs=1, length_buckets=BUCKETS,
              max_length=BUCKETS[-1], max_images=2, max_patches=MAX_PATCHES, batch_size=2,
              **PX)
  return next(make(source, **dict(opts, **kw)))


def _device(batch):
  return {k: v for k, v in batch.items() if v.dtype != object}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """A tiny HF model whose vocab is the tiny tokenizer's (norms and biases perturbed, as
  factories.make_hf_model does), its atlas_jax load, one SFT and one RL batch, and
  transformers' per-token log-probs of the SFT batch."""
  tmp = tmp_path_factory.mktemp("multi_image")
  path = str(tmp / "hf")
  model, tok = F.save_tiny_hf_with_tokenizer(path, "tied_mha")
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.add_(0.1 * torch.randn_like(p))
    # Sharper logits and stronger image features than a 0.02-std init gives, so that an
    # error in how an image is encoded or placed moves the log-probs by more than TOL.
    model.model.language_model.norm.weight.mul_(10.0)
    model.model.visual.merger.mlp[2].weight.mul_(5.0)
  model.save_pretrained(path)
  config, params = hf.load(path)
  images = _images(tmp)
  sft_batch = _batch(pipeline.sft_pipeline, _build(tmp, "chat", _chat_rows(*images)), tok,
                     prompt_suffix="")
  rl_batch = _batch(pipeline.rl_pipeline, _build(tmp, "rl", _rl_rows(*images)), tok,
                    prompt_suffix=chat.BOXED_SUFFIX)
  hf_logps = [_hf_logps(model, sft_batch, r, config.image_token_id) for r in range(2)]
  return dict(model=model, tok=tok, config=config, params=params, sft=sft_batch, rl=rl_batch,
              hf_sft_logps=hf_logps)


def _row(batch, r):
  """Row r of a batch as transformers takes one sample: flat real patches and grids."""
  grid = batch["image_grid_thw"][r]
  grid = grid[grid.prod(-1) > 0].astype(np.int64)
  return batch["pixel_values"][r, :int(grid.prod(-1).sum())], grid


def _flat_images(batch):
  """The batch's images in transformers' flat form: real patches and grids, row-major."""
  rows = [_row(batch, r) for r in range(len(batch["input_ids"]))]
  return np.concatenate([p for p, _ in rows]), np.concatenate([g for _, g in rows])


def _patch_ranges(batch, r):
  """[(first, end)] rows of pixel_values[r] that hold each image's patches."""
  grid = batch["image_grid_thw"][r]
  ends = np.cumsum(grid[grid.prod(-1) > 0].prod(-1))
  return list(zip(np.concatenate([[0], ends[:-1]]), ends))


def _mm_types(ids, image_id):
  return torch.from_numpy((ids == image_id).astype(np.int64))


def _check_layout(batch, config):
  """Both records are there, the two images' grids differ, one row pads a grid row."""
  rows = {i: r for r, i in enumerate(batch["id"])}
  assert sorted(rows) == ["one", "two"]
  two, one = batch["image_grid_thw"][rows["two"]], batch["image_grid_thw"][rows["one"]]
  assert two.tolist() == [[1, 6, 10], [1, 10, 4]] and one.tolist() == [[1, 4, 6], [0, 0, 0]]
  for r in range(2):
    n_pad = int((batch["input_ids"][r] == config.image_token_id).sum())
    assert n_pad == int(batch["image_grid_thw"][r].prod(-1).sum()) // 4
  return rows


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_pipeline_positions_equal_transformers(case, kind):
  """M-RoPE positions the pipeline collates (right-padded SFT, left-padded RL prompts)
  equal transformers' get_rope_index on the same padded batch."""
  batch, config = case[kind], case["config"]
  _check_layout(batch, config)
  ids = batch["input_ids"]
  assert (batch["attention_mask"][:, 0 if kind == "rl" else -1] == 0).any()  # padded
  _, grid = _flat_images(batch)
  want, _ = case["model"].model.get_rope_index(
      torch.from_numpy(ids.astype(np.int64)),
      mm_token_type_ids=_mm_types(ids, config.image_token_id),
      image_grid_thw=torch.from_numpy(grid),
      attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)))
  np.testing.assert_array_equal(batch["position_ids"], want.numpy().transpose(1, 0, 2))


def _hf_logps(model, batch, r, image_id):
  """Per-token log-probs float[n - 1] of row r's next tokens under transformers."""
  n = int(batch["attention_mask"][r].sum())
  ids = batch["input_ids"][r:r + 1, :n].astype(np.int64)
  px, grid = _row(batch, r)
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px),
                   image_grid_thw=torch.from_numpy(grid),
                   mm_token_type_ids=_mm_types(ids, image_id)).logits[0].numpy()
  logp = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
  return np.take_along_axis(np.asarray(logp[:-1]), ids[0, 1:, None], -1)[:, 0]


def test_sft_loss_equals_transformers(case):
  """The SFT batch through the training loss's own functions (model_hidden +
  chunked_token_stats, as sft_loss) gives transformers' per-token log-probs, and each
  image changes exactly the tokens after its own placeholders."""
  batch, config, params = case["sft"], case["config"], case["params"]
  rows = _check_layout(batch, config)
  r = rows["two"]
  assert batch["loss_mask"][r].sum() > 0

  @jax.jit
  def logps(params, b):
    targets = logprobs.targets(b)
    return logprobs.chunked_token_stats(config, params, logprobs.model_hidden(config, params, b),
                                   targets, CHUNK)["logp"]

  got = np.asarray(logps(params, _device(batch)))
  for i in range(2):
    n = int(batch["attention_mask"][i].sum())
    want = case["hf_sft_logps"][i]
    diff = np.abs(got[i, :n - 1] - want).max()
    print(f"\n[multi-image sft] row {batch['id'][i]}: max |logp diff| = {diff:.2e}")
    assert diff <= TOL

  # Each image contributes, to the tokens from its own placeholders on only.
  pads = np.flatnonzero(batch["input_ids"][r] == config.image_token_id)
  for k, (lo, hi) in enumerate(_patch_ranges(batch, r)):
    changed = dict(batch, pixel_values=batch["pixel_values"].copy())
    changed["pixel_values"][r, lo:hi] *= -1.0
    other = np.asarray(logps(params, _device(changed)))
    start = pads[lo // 4]  # the image's first <|image_pad|>
    np.testing.assert_allclose(other[r, :start], got[r, :start], atol=1e-6)
    assert np.abs(other[r, start:] - got[r, start:]).max() > 1e-3, f"image {k} has no effect"
    np.testing.assert_array_equal(other[1 - r], got[1 - r])  # the other row's images only


def test_sft_step_on_two_images(case):
  """One jitted sft_step: its loss is transformers' token-mean cross-entropy over the loss
  mask of the whole batch, it is finite, and it updates the vision tower and the decoder."""
  batch, config, params = case["sft"], case["config"], case["params"]
  want_sum, want_n = 0.0, 0
  for i in range(2):
    n = int(batch["attention_mask"][i].sum())
    logp = case["hf_sft_logps"][i]
    mask = batch["loss_mask"][i, 1:n]
    want_sum, want_n = want_sum - float((logp * mask).sum()), want_n + int(mask.sum())
  c = sft_config.get_config("tiny")
  c.optim.warmup_steps = 0  # the first step at the full rate (a warmup starts at 0)
  optimizer = optimizer_lib.make_optimizer(run_lib.resolve_optim(c))
  state = TrainState.create(params, optimizer, 0)  # not donated: params stay valid
  step = jax.jit(functools.partial(sft_step, config=config, optimizer=optimizer,
                                   functional_ids=jnp.zeros((0,), jnp.int32),
                                   chunk=BUCKETS[0]))
  new, metrics = step(state, _device(batch))
  loss = float(metrics["loss"])
  print(f"\n[multi-image sft] loss {loss:.6f} vs transformers {want_sum / want_n:.6f}")
  assert abs(loss - want_sum / want_n) <= TOL
  assert float(metrics["tokens"]) == want_n
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["skipped_step"]) == 0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       new.params, params)
  assert moved["visual"]["patch_embed"]["kernel"] > 0
  assert max(jax.tree.leaves(moved["decoder"])) > 0


def _blocked(config):
  return (config.image_token_id, config.video_token_id, config.vision_start_token_id,
          config.vision_end_token_id)


def test_rollout_greedy_equals_transformers_and_trainer(case):
  """The RL pipeline's prompt batch through the Sampler (greedy) gives transformers'
  `generate` tokens and their log-probs; the sampler's log-probs are the trainer's
  (token_logps on the assembled rollout batch, as the RL loop takes old log-probs); and
  changing the second image changes them, in its own row only."""
  batch, config, params, tok = case["rl"], case["config"], case["params"], case["tok"]
  r = _check_layout(batch, config)["two"]
  n, stop = 16, tok.convert_tokens_to_ids("<|im_end|>")
  ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
  px, grid = _flat_images(batch)
  with torch.no_grad():
    out = case["model"].generate(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
        pixel_values=torch.from_numpy(px), image_grid_thw=torch.from_numpy(grid),
        mm_token_type_ids=_mm_types(ids, config.image_token_id), max_new_tokens=n,
        do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id,
        bad_words_ids=[[b] for b in _blocked(config)], return_dict_in_generate=True,
        output_logits=True)
  want = out.sequences[:, ids.shape[1]:].numpy()
  hf_logp = jax.nn.log_softmax(torch.stack(out.logits, 1).numpy().astype(np.float64), -1)
  settings = SamplerSettings(max_new_tokens=n, greedy=True, stop_ids=(stop,),
                             pad_id=tok.pad_token_id)
  sampler = Sampler(config, settings, allowed_ids(tok, config))
  prompts = _device(batch)
  got = sampler.sample(params, prompts, jax.random.key(0))
  tokens, cmask, logps = (np.asarray(got[k]) for k in ("tokens", "mask", "logps"))
  for i in range(2):
    k = int(cmask[i].sum())
    np.testing.assert_array_equal(tokens[i, :k], want[i, :k])
    hf_token_logp = np.take_along_axis(np.asarray(hf_logp[i, :k]), want[i, :k, None], -1)
    np.testing.assert_allclose(logps[i, :k], hf_token_logp[:, 0], atol=TOL, rtol=0)
    if k < n:
      assert tokens[i, k - 1] == stop

  rollout_batch = rollout.assemble({k: prompts[k] for k in ("input_ids", "attention_mask",
                                                            "pixel_values", "image_grid_thw")},
                                   got, jnp.zeros((2,), jnp.float32), group_size=1)
  trainer, _ = jax.jit(functools.partial(token_logps, config, chunk=n))(params, rollout_batch)
  pred = np.asarray(rollout_batch["completion_mask"])[:, 1:]  # j predicts token j + 1
  diff = np.abs((np.asarray(trainer) - np.asarray(rollout_batch["sampler_logp"]))[:, :-1]
                * pred).max()
  print(f"\n[multi-image rollout] max |sampler logp - trainer logp| = {diff:.2e}")
  assert pred.sum() > 0 and diff <= TOL

  changed = dict(prompts, pixel_values=prompts["pixel_values"].copy())
  lo, hi = _patch_ranges(batch, r)[1]
  changed["pixel_values"][r, lo:hi] *= -1.0  # the second image's patches
  other = sampler.sample(params, changed, jax.random.key(0))
  assert np.abs(np.asarray(other["logps"])[r, 0] - np.asarray(got["logps"])[r, 0]) > 1e-4
  np.testing.assert_array_equal(np.asarray(other["logps"])[1 - r],
                                np.asarray(got["logps"])[1 - r])


def _loop_config(module, tmp, data_file, **changes):
  c = module.get_config("tiny")
  c.data.train_jsonl = data_file
  c.data.dataset_dir = str(tmp / f"data_{c.recipe}")
  c.data.max_images = 2
  c.data.max_patches = MAX_PATCHES
  c.data.min_pixels, c.data.max_pixels = PX["min_pixels"], PX["max_pixels"]
  c.data.max_length = BUCKETS[-1]
  c.data.length_buckets = BUCKETS
  c.data.batch_size = 2
  c.data.prompt_suffix = ""
  c.train.log_every = 1
  c.optim.warmup_steps = 0
  c.checkpoint.async_save = False
  return F.override(c, changes)


def _loop_batch(make, run):
  """The first batch the loop's pipeline options give (unshuffled): what a step trains on."""
  opts = dict(run_lib.data_options(run.config, run.tokenizer, shuffle=False), batch_size=2)
  batch = next(make(pipeline.open_source(run.data_report, "train"), **opts))
  return _check_layout(batch, run.model_config)


def _rows(workdir, prefix):
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return ([r for r in rows if r.get("prefix") == prefix],
          {r["text"]: r["value"] for r in rows if "text" in r})


@pytest.mark.slow  # about 70 s on 2 busy CPU cores: two loops, each compiling its steps
def test_sft_then_rl_loops_on_two_image_files(tmp_path):
  """train_sft for 2 steps on a two-image chat file, then train_rl for 1 step from its
  checkpoint on two-image RL rows (data.max_images = 2): no record is skipped, the steps
  are finite, and the rollout log-probs equal the trainer's on the two-image prompts."""
  from atlas_jax.rl.loop import train_rl
  from atlas_jax.sft.loop import train_sft
  from configs import rl as rl_config
  images = _images(tmp_path)
  sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
  c = _loop_config(sft_config, tmp_path, _write_jsonl(tmp_path / "chat.jsonl",
                                                      _chat_rows(*images)),
                   **{"train.steps": 2, "checkpoint.every": 2, "train.logprob_chunk": 64})
  state, _, run = train_sft(c, str(sft_dir))
  assert int(state.step) == 2 and run.data_report["counts"] == {"train": 2}
  _loop_batch(pipeline.sft_pipeline, run)
  rows, texts = _rows(sft_dir, "train")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["skipped_steps_total"] == 0 for r in rows)
  assert texts["skipped_records"] == "no records skipped"

  c = _loop_config(rl_config, tmp_path, _write_jsonl(tmp_path / "rl.jsonl", _rl_rows(*images)),
                   **{"train.steps": 1, "checkpoint.every": 1, "train.logprob_chunk": 16,
                      "rl.max_new_tokens": 16, "rl.group_size": 2, "rl.prompts_per_step": 2,
                      "model.init_checkpoint": str(sft_dir / "checkpoints"),
                      "tokenizer.path": str(sft_dir / "tokenizer")})
  state, _, run = train_rl(c, str(rl_dir))
  assert int(state.step) == 1 and run.data_report["counts"] == {"train": 2}
  _loop_batch(pipeline.rl_pipeline, run)
  [row], _ = _rows(rl_dir, "rl")
  print(f"\n[multi-image loops] sft loss {rows[0]['loss']:.3f} -> {rows[1]['loss']:.3f}; "
        f"rl logp_drift {row['logp_drift']:.2e}")
  assert all(np.isfinite(row[k]) for k in ("loss", "grad_norm", "reward"))
  assert row["logp_drift"] <= TOL
