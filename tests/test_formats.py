"""Readers for users' formats (chat/sharegpt, LLaVA, RL rows), multi-turn rendering with
per-turn loss masks, and the convert_data tool."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from atlas_jax.data import chat, formats, pipeline, schema, tfds_builder
from atlas_jax.data import tokenizer as tokenizer_lib


def _draw(path, w=84, h=56, color="red"):
  img = Image.new("RGB", (w, h), "white")
  ImageDraw.Draw(img).ellipse((8, 8, w - 8, h - 8), fill=color)
  img.save(path)
  return str(path)


def _png_bytes(color="blue"):
  buf = io.BytesIO()
  Image.new("RGB", (56, 56), color).save(buf, "PNG")
  return buf.getvalue()


def _records(path, **kw):
  return list(formats.iter_records(str(path), **kw))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  t = tokenizer_lib.build_tokenizer(str(tmp_path_factory.mktemp("tok")))
  t.add_tokens(["<|Shape|>", "<|Text|>"])
  return t


def test_chat_messages_multi_turn_system_and_placeholders(tmp_path):
  _draw(tmp_path / "a.png")
  _draw(tmp_path / "b.png", color="green")
  rows = [{"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "<image>What is red?"},
      {"role": "assistant", "content": "A circle.\n<|Shape|>\nIt is round."},
      {"role": "user", "content": "And here? <image>"},
      {"role": "assistant", "content": "<|Text|>\nGreen. \\boxed{green}"}],
      "images": ["a.png", "b.png"]}]
  (tmp_path / "chat.json").write_text(json.dumps(rows))
  [rec] = _records(tmp_path / "chat.json")
  assert rec.system == "Be brief." and rec.id == "chat-000000" and rec.answer == "green"
  assert rec.history == (("<image>What is red?", "A circle.\n<|Shape|>\nIt is round."),)
  assert rec.question == "And here? <image>"
  assert rec.trajectory == "<|Text|>\nGreen. \\boxed{green}"
  assert rec.images == (str(tmp_path / "a.png"), str(tmp_path / "b.png"))


def test_sharegpt_conversations_jsonl_and_image_root(tmp_path):
  root = tmp_path / "imgs"
  root.mkdir()
  _draw(root / "x.png")
  rows = [{"conversations": [{"from": "human", "value": "Count <image> dots."},
                             {"from": "gpt", "value": "Three. \\boxed{3}"}],
           "images": ["x.png"], "system": "sys"}]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  [rec] = _records(tmp_path / "d.jsonl", image_root=str(root))
  assert rec.images == (str(root / "x.png"),) and rec.system == "sys" and rec.answer == "3"
  assert formats.detect(rows[0]) == "chat"


def test_llava_list_with_single_image_and_absolute_path(tmp_path):
  a = _draw(tmp_path / "a.png")
  rows = [{"id": 7, "image": a, "conversations": [
      {"from": "human", "value": "<image>\nWhich color?"}, {"from": "gpt", "value": "Red."}]},
          {"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                        {"from": "gpt", "value": "Hello"}]}]
  (tmp_path / "llava.json").write_text(json.dumps(rows, indent=2))
  recs = _records(tmp_path / "llava.json")
  assert [r.id for r in recs] == ["7", "t"]
  assert recs[0].images == (a,) and recs[0].answer == "Red." and recs[1].images == ()
  assert formats.detect(rows[0]) == "llava"


def test_rl_rows_verl_easyr1_trl(tmp_path):
  img = _draw(tmp_path / "p.png")
  b64 = base64.b64encode(_png_bytes()).decode()
  rows = [{"problem": "<image>How many?", "answer": "4", "images": ["p.png"]},        # EasyR1
          {"prompt": [{"role": "user", "content": "<image>Which?"}],                  # verl
           "images": [{"bytes": b64}], "reward_model": {"ground_truth": "B"},
           "data_source": "geo"},
          {"prompt": "Solve it.", "solution": "<answer>\\boxed{12}</answer>",         # TRL
           "image": "data:image/png;base64," + b64}]
  (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  recs = _records(tmp_path / "rl.jsonl")
  assert [r.answer for r in recs] == ["4", "B", "12"]
  assert all(r.trajectory == "" for r in recs)
  assert recs[0].images == (img,) and recs[1].task == "geo"
  assert recs[1].images == (_png_bytes(),) and recs[2].images == (_png_bytes(),)
  assert recs[1].question == "<image>Which?"


def test_bad_records_come_out_by_reason(tmp_path):
  _draw(tmp_path / "a.png")
  good = {"messages": [{"role": "user", "content": "<image>Q"},
                       {"role": "assistant", "content": "A"}], "images": ["a.png"]}
  lines = [json.dumps(dict(good, id="g")).encode(),
           b'{"id": "u", "messages": "\xff\xfe"}',
           json.dumps(dict(good, id="g")).encode(),                       # duplicate
           json.dumps(dict(good, id="m", images=["a.png", "a.png"])).encode(),
           json.dumps({"id": "r", "messages": [{"role": "assistant", "content": "x"}]}).encode(),
           json.dumps(dict(good, id="t", messages=[
               {"role": "user", "content": "Q"},
               {"role": "assistant", "content": "<|Bad|>"}])).encode(),
           json.dumps({"foo": 1}).encode(), b"[1, 2"]
  (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  out = _records(tmp_path / "bad.jsonl")
  reasons = [r.reason if isinstance(r, schema.BadRecord) else "ok" for r in out]
  assert reasons == ["ok", "undecodable_bytes", "duplicate_id", "image_count_mismatch",
                     "bad_field_type", "unknown_special_token", "missing_field",
                     "malformed_json"]


def test_broken_json_list_is_salvaged(tmp_path):
  items = [json.dumps({"id": f"r{i}", "images": [], "question": "Q", "trajectory": "T",
                       "answer": "A"}, indent=2) for i in range(3)]
  items[1] = items[1].replace('"T"', '"T\x00', 1)[:-5]  # truncated element
  (tmp_path / "l.json").write_text("[\n" + ",\n".join(items) + "\n]")
  out = _records(tmp_path / "l.json")
  assert [getattr(r, "id", None) or r.reason for r in out] == ["r0", "malformed_json", "r2"]


def test_multi_turn_loss_mask_covers_every_assistant_turn(tok):
  history = [("<image>First?", "One.\n<|Shape|>\nDone.")]
  out = chat.render(tok, "Second? <image>", "Two. \\boxed{2}", [4, 9], system="Sys.",
                    history=history)
  ids, mask = out["input_ids"], out["loss_mask"]
  pad = tok.convert_tokens_to_ids("<|image_pad|>")
  assert int((ids == pad).sum()) == 13
  # Both replies (and their <|im_end|>) are in the loss, nothing else.
  spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  pieces = [tok.decode(ids[a:b]) for a, b in zip(spans[::2], spans[1::2])]
  assert pieces == ["One.\n<|Shape|>\nDone.<|im_end|>", "Two. \\boxed{2}<|im_end|>"]
  shape = tok.convert_tokens_to_ids("<|Shape|>")
  assert mask[ids == shape].tolist() == [1]
  # The first image sits in the first user turn, the second at the end of the second.
  whole = tok.apply_chat_template(
      chat.messages("Second? <image>", 2, system="Sys.", history=history)
      + [{"role": "assistant", "content": "Two. \\boxed{2}"}], tokenize=False)
  ref = chat.expand_image_pads(tok.encode(whole, add_special_tokens=False), pad, [4, 9])
  np.testing.assert_array_equal(ids, ref)
  assert "<|im_start|>system\nSys.<|im_end|>" in whole
  assert "user\nSecond? <|vision_start|><|image_pad|><|vision_end|><|im_end|>" in whole
  prompt = chat.render(tok, "Second? <image>", None, [4, 9], history=history)
  assert prompt["loss_mask"].sum() == 0
  assert tok.decode(prompt["input_ids"]).endswith("<|im_start|>assistant\n")


def test_each_format_builds_and_trains_through_the_pipeline(tmp_path, tok):
  """A chat file with two images and two turns goes through TFDS and grain: both turns in
  the loss, two image grids, the system prompt rendered."""
  _draw(tmp_path / "a.png")
  _draw(tmp_path / "b.png", 56, 112)
  rows = [{"id": f"c{i}", "messages": [
      {"role": "system", "content": "Sys."},
      {"role": "user", "content": "<image>Look."}, {"role": "assistant", "content": "Seen."},
      {"role": "user", "content": "<image>Which? "},
      {"role": "assistant", "content": f"<|Shape|>\n\\boxed{{{i}}}"}],
      "images": ["a.png", "b.png"]} for i in range(3)]
  (tmp_path / "c.json").write_text(json.dumps(rows))
  opts = tfds_builder.BuildOptions(min_pixels=3136, max_pixels=28 * 28 * 16, max_images=2,
                                   max_patches=128)
  report = tfds_builder.build_dataset(splits={"train": str(tmp_path / "c.json")},
                                      data_dir=str(tmp_path / "tfds"), options=opts)
  assert report["counts"] == {"train": 3}
  p = pipeline.sft_pipeline(
      tfds_builder.open_source(report, "train"), tokenizer=tok, seed=0, num_epochs=1,
      shuffle=False, min_pixels=3136, max_pixels=28 * 28 * 16, max_length=256,
      length_buckets=(256,), max_images=2, max_patches=128, batch_size=3, prompt_suffix="")
  b = next(p)
  assert b["image_grid_thw"].shape == (3, 2, 3) and (b["image_grid_thw"][:, :, 0] == 1).all()
  text = tok.decode(b["input_ids"][0][b["loss_mask"][0] == 1])
  assert text == f"Seen.<|im_end|><|Shape|>\n\\boxed{{{b['id'][0][1:]}}}<|im_end|>"
  assert "Sys." in tok.decode(b["input_ids"][0]) and not p.skipped


def test_convert_data_writes_project_jsonl_and_counts(tmp_path):
  _draw(tmp_path / "a.png")
  b64 = base64.b64encode(_png_bytes()).decode()
  rows = [{"messages": [{"role": "user", "content": "<image>Q1"},
                        {"role": "assistant", "content": "\\boxed{A}"}], "images": ["a.png"]},
          {"messages": [{"role": "user", "content": "<image>Q2"},
                        {"role": "assistant", "content": "\\boxed{B}"}],
           "images": [{"bytes": b64}]},
          {"messages": [{"role": "user", "content": "<image>Q3"},
                        {"role": "assistant", "content": "x"}], "images": ["nope.png"]}]
  (tmp_path / "src.json").write_text(json.dumps(rows))
  dst = tmp_path / "out" / "train.jsonl"
  res = subprocess.run([sys.executable, "-m", "launch.convert_data", f"--src={tmp_path}/src.json",
                        f"--dst={dst}"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert res.returncode == 0, res.stderr
  assert "wrote 2 records" in res.stdout and "missing_image: 1" in res.stdout
  records, skipped = formats.read_jsonl(str(dst))
  assert not skipped and [r.answer for r in records] == ["A", "B"]
  with open(records[1].images[0], "rb") as f:
    assert f.read() == _png_bytes()
  assert records[0].images == (str(tmp_path / "a.png"),)


def test_multi_image_sample_equals_transformers_processing(tmp_path, tok):
  """A two-image, two-turn chat record through build + pipeline equals what transformers'
  Qwen2-VL processing gives: its image processor's patches and grids for both images, and
  the templated conversation with each <|image_pad|> expanded to grid.prod() / 4 (as
  Qwen2_5_VLProcessor does), tokenized as a whole."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
      Qwen2VLImageProcessorPil)
  _draw(tmp_path / "a.png", 140, 84)
  _draw(tmp_path / "b.png", 56, 150, color="blue")
  msgs = [{"role": "user", "content": "Look <image> here."},
          {"role": "assistant", "content": "A red disc.\n<|Shape|>"},
          {"role": "user", "content": "<image>\nAnd this one?"},
          {"role": "assistant", "content": "Blue. \\boxed{blue}"}]
  (tmp_path / "m.jsonl").write_text(json.dumps({"id": "m", "messages": msgs,
                                                "images": ["a.png", "b.png"]}) + "\n")
  px_opts = dict(min_pixels=3136, max_pixels=28 * 28 * 20)
  report = tfds_builder.build_dataset(
      splits={"train": str(tmp_path / "m.jsonl")}, data_dir=str(tmp_path / "tfds"),
      options=tfds_builder.BuildOptions(max_images=2, max_patches=160, **px_opts))
  b = next(pipeline.sft_pipeline(
      tfds_builder.open_source(report, "train"), tokenizer=tok, seed=0, num_epochs=1,
      length_buckets=(256,), max_length=256, max_images=2, max_patches=160, batch_size=1,
      prompt_suffix="", **px_opts))
  ref = Qwen2VLImageProcessorPil(**px_opts)(
      images=[Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")],
      return_tensors="np")
  grid = np.asarray(ref["image_grid_thw"])
  np.testing.assert_array_equal(b["image_grid_thw"][0], grid)
  px = np.asarray(ref["pixel_values"])
  np.testing.assert_allclose(b["pixel_values"][0, :len(px)], px, atol=1e-6)
  hf_msgs = [dict(m, content=m["content"].replace("<image>", "<|vision_start|><|image_pad|>"
                                                   "<|vision_end|>")) for m in msgs]
  text = tok.apply_chat_template(hf_msgs, tokenize=False)
  for n in grid.prod(-1) // 4:
    text = text.replace("<|image_pad|>", "<|placeholder|>" * int(n), 1)
  want = tok.encode(text.replace("<|placeholder|>", "<|image_pad|>"), add_special_tokens=False)
  n = int(b["attention_mask"][0].sum())
  assert b["input_ids"][0, :n].tolist() == want
  target = tok.decode(b["input_ids"][0][b["loss_mask"][0] == 1])
  assert target == "A red disc.\n<|Shape|><|im_end|>Blue. \\boxed{blue}<|im_end|>"
