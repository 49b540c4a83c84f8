"""TFDS build (with bad records) and the grain pipelines."""

import json
import os
import shutil

import numpy as np
import pytest

from atlas_jax import functional_tokens
from atlas_jax.data import image as image_lib
from atlas_jax.data import pipeline, synthetic, tfds_builder, tokenizer as tokenizer_lib
from atlas_jax.model import get_rope_index

OPTS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 36, max_length=256,
            length_buckets=(128, 192, 256), max_images=1, max_patches=144, batch_size=4,
            prompt_suffix="\nPut the final answer in \\boxed{}.")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  train = synthetic.generate_suite(str(root / "raw"), n_per_family=4, seed=0)
  lines = open(train).read().splitlines()
  good = json.loads(lines[0])
  (root / "raw" / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  bad = ["{broken json",
         json.dumps(dict(good, id="missing-img", images=["images/none.png"])),
         json.dumps(dict(good, id="corrupt-img", images=["images/corrupt.png"])),
         json.dumps(dict(good, id="long", question="why " * 400)),
         json.dumps(dict(good, id="unknown", trajectory="x <|Foo|> \\boxed{A}"))]
  with open(train, "w") as f:
    f.write("\n".join(lines[:7] + bad + lines[7:]) + "\n")
  test = synthetic.generate_suite(str(root / "raw"), n_per_family=2, seed=1, split="test")
  report = tfds_builder.build_dataset(splits={"train": train, "test": test},
                                      data_dir=str(root / "tfds"))
  tok = tokenizer_lib.build_tokenizer(str(root / "tok"))
  tok.add_tokens(list(functional_tokens.TASK_TOKENS.values()))
  return report, tok, root


def test_build_counts_and_skips_by_reason(data):
  report, _, root = data
  assert report["counts"] == {"train": 21, "test": 10}
  assert report["skipped"]["train"] == {"malformed_json": 1, "missing_image": 1,
                                        "corrupt_image": 1, "unknown_special_token": 1}
  again = tfds_builder.build_dataset(splits={}, data_dir=str(root / "tfds"))  # reused
  assert again == report


def test_sft_batches_have_the_contract(data):
  report, tok, _ = data
  src = tfds_builder.open_source(report, "train")
  p = pipeline.sft_pipeline(src, tokenizer=tok, seed=0, num_epochs=1, **OPTS)
  rows = 0
  for b in p:
    rows += int(b["valid"].sum())
    t = b["input_ids"].shape[1]
    assert t in OPTS["length_buckets"]
    assert b["input_ids"].dtype == np.int32 and b["position_ids"].shape == (4, 3, t)
    assert b["pixel_values"].shape == (4, 144, 1176) and b["image_grid_thw"].shape == (4, 1, 3)
    pos, _ = get_rope_index(b["input_ids"], b["attention_mask"], b["image_grid_thw"].reshape(-1, 3),
                            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                            spatial_merge_size=2)
    np.testing.assert_array_equal(b["position_ids"], pos.transpose(1, 0, 2))
    for i in range(4):
      assert b["attention_mask"][i, 0] == 1  # right padding
      target = tok.decode(b["input_ids"][i][b["loss_mask"][i] == 1])
      assert target.endswith("<|im_end|>") and "\\boxed{" in target
      n = int(b["image_grid_thw"][i, 0].prod())
      assert not b["pixel_values"][i, n:].any()
  assert rows == 20 and dict(p.skipped) == {"too_long": 1}  # the 400-word question


def test_a_bad_record_is_counted_once_over_epochs(data):
  report, tok, _ = data
  src = tfds_builder.open_source(report, "train")
  p = pipeline.sft_pipeline(src, tokenizer=tok, seed=0, num_epochs=3, **OPTS)
  rows = sum(int(b["valid"].sum()) for b in p)
  assert rows == 60 and dict(p.skipped) == {"too_long": 1}


def test_pixels_equal_image_preprocess(data):
  report, tok, root = data
  src = tfds_builder.open_source(report, "test")
  b = next(pipeline.sft_pipeline(src, tokenizer=tok, seed=0, shuffle=False, **OPTS))
  from PIL import Image
  path = os.path.join(root, "raw", "images", b["id"][0] + ".png")
  px, grid = image_lib.preprocess([Image.open(path)], min_pixels=OPTS["min_pixels"],
                                  max_pixels=OPTS["max_pixels"])
  np.testing.assert_array_equal(b["image_grid_thw"][0], grid)
  np.testing.assert_array_equal(b["pixel_values"][0, :len(px)], px)


def _ids(p, n):
  return [list(next(p)["id"]) for _ in range(n)]


def test_determinism_seed_and_state_restore(data):
  report, tok, _ = data
  src = tfds_builder.open_source(report, "train")
  make = lambda seed: pipeline.sft_pipeline(src, tokenizer=tok, seed=seed, **OPTS)
  assert _ids(make(0), 5) == _ids(make(0), 5)
  assert _ids(make(0), 5) != _ids(make(1), 5)
  p = make(0)
  _ids(p, 3)
  state = p.get_state()
  json.dumps(state)  # checkpointable as JSON
  expected = _ids(p, 4)
  q = make(0)
  q.set_state(state)
  assert _ids(q, 4) == expected


def test_process_shards_are_disjoint_and_cover(data):
  report, tok, _ = data
  src = tfds_builder.open_source(report, "test")
  seen = []
  for shard in range(2):
    p = pipeline.sft_pipeline(src, tokenizer=tok, seed=0, num_epochs=1, shard_index=shard,
                              shard_count=2, **dict(OPTS, batch_size=2))
    ids = [i for b in p for i, v in zip(b["id"], b["valid"]) if v]
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 10


def test_rl_prompts_are_left_padded_and_end_with_the_header(data):
  report, tok, _ = data
  src = tfds_builder.open_source(report, "test")
  b = next(pipeline.rl_pipeline(src, tokenizer=tok, seed=0, **OPTS))
  assert (b["attention_mask"][:, -1] == 1).all() and b["loss_mask"].sum() == 0
  for row in b["input_ids"]:
    assert tok.decode(row).endswith("<|im_start|>assistant\n")
  assert set(b["answer"]) <= set("ABCD")


def test_report_skipped_text():
  import collections
  assert pipeline.report_skipped(collections.Counter()) == "no records skipped"
  assert pipeline.report_skipped(collections.Counter(too_long=2, corrupt_image=1)) == (
      "skipped 3 records: corrupt_image=1, too_long=2")


def test_a_missing_dependency_stops_instead_of_skipping_every_record(data, monkeypatch):
  """A record that fails to render is skipped; an ImportError while rendering (e.g. jinja2
  missing for the chat template) is the environment's, and skipping every record for it
  would hide it: it propagates."""
  report, tok, _ = data
  from atlas_jax.data import chat
  source = tfds_builder.open_source(report, "train")
  def broken(*args, **kwargs):
    raise RuntimeError("a record this renderer cannot take")
  monkeypatch.setattr(chat, "render", broken)
  p = pipeline.sft_pipeline(source, tokenizer=tok, seed=0, num_epochs=1, shuffle=False,
                            **dict(OPTS, batch_size=2))
  assert list(p) == [] and p.skipped["render_error"] > 0
  def missing(*args, **kwargs):
    raise ImportError("apply_chat_template requires jinja2 to be installed.")
  monkeypatch.setattr(chat, "render", missing)
  p = pipeline.sft_pipeline(source, tokenizer=tok, seed=0, num_epochs=1, shuffle=False,
                            **dict(OPTS, batch_size=2))
  with pytest.raises(ImportError, match="jinja2"):
    next(p)
