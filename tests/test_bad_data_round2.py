"""Round two of bad input (issue 27, items 2, 6 and 7), through the real build, pipeline and
converter: records that used to end the build are counted by reason, paths that are not
regular files are refused before they are opened, a file (or split) with nothing usable
stops with one sentence instead of a TFDS traceback or an endless loop, and odd but valid
files train with their images decoded as transformers decodes them."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, features

from atlas_jax.data import formats, pipeline, schema, tfds_builder
from atlas_jax.data import tokenizer as tokenizer_lib
from atlas_jax.eval import benchmarks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 36)
OPTS = dict(PIXELS, max_length=256, length_buckets=(128, 256), max_images=2, max_patches=288,
            batch_size=2, prompt_suffix="")


def _picture(w=84, h=56, mode="RGB"):
  """A picture whose orientation shows: a red block top-left, a blue bar on the right."""
  img = Image.new("RGB", (w, h), "white")
  draw = ImageDraw.Draw(img)
  draw.rectangle((0, 0, w // 3, h // 3), fill="red")
  draw.rectangle((w - w // 5, 0, w - 1, h - 1), fill="blue")
  return img.convert(mode) if mode != "RGB" else img


def _chat(rid, images=("a.png",), question="<image>Which colour?", answer="\\boxed{A}",
          role="user"):
  return {"id": rid, "images": list(images), "messages": [
      {"role": role, "content": question}, {"role": "assistant", "content": answer}]}


def _build(tmp_path, splits, **options):
  return tfds_builder.build_dataset(splits={k: str(v) for k, v in splits.items()},
                                    data_dir=str(tmp_path / "tfds"),
                                    options=tfds_builder.BuildOptions(**options))


def _in_thread(fn, timeout):
  """fn() in a daemon thread: (finished, its result or exception)."""
  out = {}

  def run():
    try:
      out["value"] = fn()
    except BaseException as e:  # noqa: BLE001
      out["value"] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(timeout)
  return not thread.is_alive(), out.get("value")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


# ---------------------------------------------------------------------------------------
# Item 6: nothing in a data file ends, hangs or stalls a run

# The records that ended the build before: id -> (JSON line, the reason it is counted under)
KILLERS = {
    "role": (json.dumps(_chat("role", role=["user"])), "bad_field_type"),
    "bytes-str": (json.dumps(dict(_chat("bytes-str"), images=[{"bytes": ["iVBO", "Rw0"]}])),
                  "bad_field_type"),
    "bytes-int": (json.dumps(dict(_chat("bytes-int"), images=[{"bytes": [137, 80, 300]}])),
                  "bad_field_type"),
    "path-nul": (json.dumps(_chat("path-nul", images=["a\0.png"])), "bad_field_type"),
    "path-surrogate": (json.dumps(_chat("path-surrogate", images=["a\udc80.png"])),
                       "invalid_text"),
    "text-surrogate": (json.dumps(_chat("text-surrogate", question="<image>caf\ud83d?")),
                       "invalid_text"),
    "id-surrogate": (json.dumps(_chat("id-\udfff")), "invalid_text"),
    "answer-surrogate": (json.dumps(_chat("answer-surrogate", answer="\\boxed{\ud800}")),
                         "invalid_text"),
    "long-int": ('{"id": "long-int", "n": ' + "7" * 5000 + "}", "malformed_json"),
    "deep": ('{"id": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "malformed_json"),
}


@pytest.mark.parametrize("layout", ["jsonl", "json list"])
def test_records_that_ended_the_build_are_counted_by_reason(tmp_path, layout):
  _picture().save(tmp_path / "a.png")
  lines = [json.dumps(_chat("good"))] + [line for line, _ in KILLERS.values()]
  if layout == "jsonl":
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
  else:
    path = tmp_path / "data.json"
    path.write_text("[\n" + ",\n".join(lines) + "\n]\n")
  report = _build(tmp_path, {"train": path})
  assert report["counts"] == {"train": 1}
  expected = {}
  for _, reason in KILLERS.values():
    expected[reason] = expected.get(reason, 0) + 1
  assert report["skipped"]["train"] == expected
  records, skipped = formats.read_jsonl(str(path))
  assert [r.id for r in records] == ["good"] and skipped == expected


def test_any_other_reader_failure_is_counted_not_raised(tmp_path, monkeypatch):
  _picture().save(tmp_path / "a.png")
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps(_chat("good")) + "\n" + json.dumps(_chat("odd")) + "\n")
  read_chat = formats.READERS["chat"]

  def fragile(d, **kw):
    if d["id"] == "odd":
      raise KeyError("a case no reader foresaw")
    return read_chat(d, **kw)
  monkeypatch.setitem(formats.READERS, "chat", fragile)
  report = _build(tmp_path, {"train": path})
  assert report["counts"] == {"train": 1} and report["skipped"]["train"] == {"read_error": 1}


def test_paths_that_are_not_regular_files_are_refused_before_opening(tmp_path):
  """A FIFO would block the build forever: it is refused from its stat, as are a directory
  and a device (/dev/null here; /dev/zero, which would be read forever, is tried in the
  memory-capped process of the next test)."""
  _picture().save(tmp_path / "a.png")
  os.mkfifo(tmp_path / "fifo.png")
  (tmp_path / "folder.png").mkdir()
  refs = {"fifo": "fifo.png", "folder": "folder.png", "null": "/dev/null"}
  rows = [_chat("good")] + [_chat(k, images=[v]) for k, v in refs.items()]
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  done, report = _in_thread(lambda: _build(tmp_path, {"train": path}), timeout=60)
  if not done:  # unblock the reader stuck on the FIFO, then fail
    os.close(os.open(tmp_path / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
  assert done, "the build blocked on an image path that is not a regular file"
  assert not isinstance(report, BaseException), report
  assert report["counts"] == {"train": 1}
  assert report["skipped"]["train"] == {"not_a_regular_file": 3}


def test_convert_data_refuses_non_regular_files_and_exits_nonzero_on_nothing(tmp_path):
  """launch.convert_data (in a process capped at 2 GiB and 120 s, so that reading
  /dev/zero or blocking on the FIFO fails the test instead of the machine)."""
  _picture().save(tmp_path / "a.png")
  os.mkfifo(tmp_path / "fifo.png")

  def convert(src, dst):
    capped = ("import resource, runpy, sys; "
              "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
              "sys.argv[0] = 'convert_data'; "
              "runpy.run_module('launch.convert_data', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", capped, f"--src={src}", f"--dst={dst}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  src = tmp_path / "mixed.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in [
      _chat("good"), _chat("fifo", images=["fifo.png"]), _chat("zero", images=["/dev/zero"]),
      _chat("gone", images=["gone.png"])]))
  res = convert(src, tmp_path / "out" / "a.jsonl")
  assert res.returncode == 0, res.stderr
  assert "wrote 1 records" in res.stdout and "not_a_regular_file: 2" in res.stdout
  assert "missing_image: 1" in res.stdout
  rows = [json.loads(l) for l in (tmp_path / "out" / "a.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rows] == ["good"]
  # Nothing usable: exit status 1, one line naming the file, the counts and where the
  # relative paths were looked for; nothing written.
  llava = tmp_path / "llava.json"
  llava.write_text(json.dumps([{"id": str(k), "image": f"coco/{k}.jpg", "conversations": [
      {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}
      for k in range(3)]))
  dst = tmp_path / "out" / "b.jsonl"
  res = convert(llava, dst)
  assert res.returncode == 1 and not dst.exists()
  assert res.stderr.strip().splitlines()[-1] == (
      f"[convert_data] no usable record in {llava}: missing_image 3 (relative image paths "
      f"were resolved against the file's folder {tmp_path}; set --image_root if they are "
      "relative to another folder)")


def test_a_file_with_no_usable_record_stops_with_one_sentence(tmp_path):
  """The everyday case: a LLaVA file whose relative image paths are under a folder not
  given as data.image_root. No TFDS traceback; the counts and the folders are named; the
  same file builds once the folder is given."""
  (tmp_path / "images" / "coco").mkdir(parents=True)
  rows = [{"id": str(k), "image": f"coco/{k}.png", "conversations": [
      {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]}
      for k in range(4)]
  rows.append({"id": "broken", "conversations": "not a list"})
  path = tmp_path / "llava.json"
  path.write_text(json.dumps(rows))
  with pytest.raises(schema.NoUsableRecord) as e:
    _build(tmp_path, {"train": path})
  assert str(e.value) == (
      f"no usable record in {path}: missing_field 1, missing_image 4 (relative image paths "
      f"were resolved against the file's folder {tmp_path}; set data.image_root if they are "
      "relative to another folder)")
  root = tmp_path / "images"
  with pytest.raises(schema.NoUsableRecord, match=re.escape(
      f"missing_image 4 (relative image paths were resolved against data.image_root {root}, "
      f"then the file's folder {tmp_path})")):
    _build(tmp_path, {"train": path}, image_root=str(root))
  for k in range(4):
    _picture().save(root / "coco" / f"{k}.png")
  report = _build(tmp_path, {"train": path}, image_root=str(root))
  assert report["counts"] == {"train": 4} and report["skipped"]["train"] == {"missing_field": 1}


def test_an_empty_or_unusable_test_split_is_named(tmp_path):
  _picture().save(tmp_path / "a.png")
  train = tmp_path / "train.jsonl"
  train.write_text(json.dumps(_chat("good")) + "\n")
  empty = tmp_path / "test.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(schema.NoUsableRecord) as e:
    _build(tmp_path, {"train": train, "test": empty})
  assert str(e.value) == f"no usable record in {empty}: it holds no record"
  assert "No examples were yielded" not in str(e.value)


def test_an_evaluation_file_with_no_usable_row_stops(tmp_path):
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps(_chat(f"q{k}", images=["nowhere.png"])) + "\n"
                          for k in range(2)) + "{broken\n")
  items, skipped = benchmarks.read(str(path))  # rows are checked, images not yet opened
  assert len(items) == 2 and skipped == {"malformed_json": 1}
  path.write_text("{broken\n" + json.dumps({"id": "x", "foo": 1}) + "\n")
  with pytest.raises(schema.NoUsableRecord, match=re.escape(
      f"no usable record in {path}: malformed_json 1, unknown_format 1")):
    benchmarks.read(str(path))


def test_parquet_image_bytes_as_integers_are_checked(tmp_path):
  """Image bytes stored as a list of integers: kept when they are bytes, counted when one
  is out of range (bytes() would raise and end the read)."""
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  buf = io.BytesIO()
  _picture().save(buf, "PNG")
  path = str(tmp_path / "bench.parquet")
  pq.write_table(pa.table({
      "index": [0, 1], "question": ["Colour?"] * 2, "A": ["red"] * 2, "B": ["blue"] * 2,
      "answer": ["A"] * 2, "image": [{"bytes": list(buf.getvalue())}, {"bytes": [137, 300]}]}),
      path)
  items, skipped = benchmarks.read(path)
  assert [i.id for i in items] == ["0"] and items[0].record.images == (buf.getvalue(),)
  assert skipped == {"bad_field_type": 1}


def _long_records(tmp_path, n_long, n_short):
  tmp_path.mkdir(exist_ok=True)
  _picture().save(tmp_path / "a.png")
  rows = [_chat(f"long{k}", question="<image>" + "why " * 300) for k in range(n_long)]
  rows += [_chat(f"short{k}") for k in range(n_short)]
  rows.append(_chat("gone", images=["gone.png"]))
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_a_split_where_nothing_fits_max_length_stops_instead_of_looping(tmp_path, tok):
  path = _long_records(tmp_path, n_long=5, n_short=0)
  report = _build(tmp_path, {"train": path})
  source = tfds_builder.open_source(report, "train")
  p = pipeline.sft_pipeline(source, tokenizer=tok, seed=0, **OPTS)  # repeats forever
  done, out = _in_thread(lambda: next(p), timeout=60)
  assert done, "the pipeline kept looking for a record that fits data.max_length"
  assert isinstance(out, schema.NoUsableRecord), out
  assert str(out).startswith(
      f"no usable record in {path}: missing_image 1, too_long 5 (every record was skipped "
      "once rendered, with data.max_length 256, data.max_images 2 and data.max_patches 288)")
  # One record that fits is enough: it repeats, and the others are counted once.
  path = _long_records(tmp_path / "one", n_long=5, n_short=1)
  report = _build(tmp_path / "one", {"train": path})
  p = pipeline.sft_pipeline(tfds_builder.open_source(report, "train"), tokenizer=tok, seed=0,
                            **OPTS)
  ids = [i for _ in range(4) for i in next(p)["id"]]
  assert set(ids) == {"short0"} and dict(p.skipped) == {"too_long": 5}


def test_more_processes_than_records_is_named(tmp_path, tok):
  _picture().save(tmp_path / "a.png")
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps(_chat("only")) + "\n")
  source = tfds_builder.open_source(_build(tmp_path, {"train": path}), "train")
  with pytest.raises(schema.NoUsableRecord, match="process 1 of 2 gets none of its 1 records"):
    pipeline.sft_pipeline(source, tokenizer=tok, seed=0, shard_index=1, shard_count=2, **OPTS)


# ---------------------------------------------------------------------------------------
# Item 7: odd files still train, images decoded as transformers decodes them


def _odd_images(folder) -> dict:
  """name -> file of each odd kind the project met in users' data."""
  os.makedirs(folder, exist_ok=True)
  out = {}

  def save(name, img, fmt, **kw):
    out[name] = os.path.join(folder, name)
    img.save(out[name], fmt, **kw)
  exif = Image.Exif()
  exif[0x0112] = 6  # shot rotated: display turned 90 degrees clockwise
  save("exif6.jpg", _picture(112, 56), "JPEG", exif=exif.tobytes(), quality=95)
  exif[0x0112] = 3
  save("exif3.png", _picture(84, 56), "PNG", exif=exif.tobytes())
  rng = np.random.default_rng(0)
  grey16 = rng.integers(0, 400, (56, 84), dtype=np.uint16)  # 16-bit values above 255
  save("grey16.png", Image.fromarray(grey16), "PNG")
  save("grey16.tif", Image.fromarray(grey16), "TIFF")
  save("cmyk.jpg", _picture(84, 84, "CMYK"), "JPEG", quality=95)
  save("cmyk.tif", _picture(84, 84, "CMYK"), "TIFF")
  save("rgb.tif", _picture(84, 112), "TIFF", compression="tiff_lzw")
  rgba = _picture(84, 84).convert("RGBA")
  rgba.putalpha(Image.linear_gradient("L").resize((84, 84)))
  save("alpha.png", rgba, "PNG")
  save("palette.png", _picture(84, 56).convert("P"), "PNG", transparency=0)
  if features.check("webp"):
    save("lossless.webp", _picture(112, 84), "WEBP", lossless=True)
  return out


def _transformers_inputs(image_bytes_list):
  """What transformers makes of the images: `load_image`'s EXIF transpose, then the
  Qwen2-VL image processor (which composites transparency onto white)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
      Qwen2VLImageProcessorPil)
  images = [ImageOps.exif_transpose(Image.open(io.BytesIO(b))) for b in image_bytes_list]
  ref = Qwen2VLImageProcessorPil(**PIXELS)(images=images, return_tensors="np")
  return np.asarray(ref["pixel_values"]), np.asarray(ref["image_grid_thw"])


def _batches_by_id(report, split, tok):
  p = pipeline.sft_pipeline(tfds_builder.open_source(report, split), tokenizer=tok, seed=0,
                            num_epochs=1, shuffle=False, **OPTS)
  rows = {}
  for b in p:
    for i in np.flatnonzero(b["valid"]):
      n = int(b["image_grid_thw"][i].prod(-1).sum())
      rows[b["id"][i]] = (b["pixel_values"][i, :n], b["image_grid_thw"][i], b, i)
  return rows, p.skipped


def _assert_as_transformers(row, image_bytes_list):
  pixels, grid, _, _ = row
  want_px, want_grid = _transformers_inputs(image_bytes_list)
  np.testing.assert_array_equal(grid[:len(want_grid)], want_grid)
  np.testing.assert_allclose(pixels, want_px, atol=1e-5, rtol=0)


def test_odd_images_train_as_transformers_decodes_them(tmp_path, tok):
  """EXIF-rotated JPEG and PNG, 16-bit PNG and TIFF, CMYK JPEG and TIFF, LZW TIFF,
  transparent PNGs and WEBP: each trains, with the pixels transformers would give."""
  images = _odd_images(tmp_path / "img")
  path = tmp_path / "odd.jsonl"
  path.write_text("".join(json.dumps(_chat(name, images=[p])) + "\n"
                          for name, p in images.items()))
  report = _build(tmp_path, {"train": path})
  assert report["counts"] == {"train": len(images)} and report["skipped"]["train"] == {}
  rows, skipped = _batches_by_id(report, "train", tok)
  assert sorted(rows) == sorted(images) and not skipped
  for name, p in images.items():
    with open(p, "rb") as f:
      _assert_as_transformers(rows[name], [f.read()])
  # The rotation is applied: the 112x56 JPEG stands 56 wide and 112 high.
  assert rows["exif6.jpg"][1].tolist()[0] == [1, 8, 4]


def test_bom_crlf_single_object_mixed_formats_data_uris_and_shared_images(tmp_path, tok):
  """A UTF-8 BOM with CRLF line ends; a .json file holding one pretty-printed object; one
  file mixing this project's schema, chat, LLaVA and RL rows, with images as data URIs
  (standard and URL-safe base64, padding dropped) and a file used by several records and
  twice by one."""
  _picture().save(tmp_path / "a.png")
  buf = io.BytesIO()
  _picture(56, 84, "RGBA").save(buf, "PNG")
  png = buf.getvalue()
  crlf = tmp_path / "windows.jsonl"
  crlf.write_bytes(b"\xef\xbb\xbf" + b"".join(
      json.dumps(_chat(f"w{k}"), ensure_ascii=False).encode() + b"\r\n" for k in range(3)))
  single = tmp_path / "single.json"
  single.write_text(json.dumps(_chat("alone"), indent=2) + "\n")
  standard = "data:image/png;base64," + base64.b64encode(png).decode()
  urlsafe = "data:image/png;base64," + base64.urlsafe_b64encode(png).decode().rstrip("=")
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": "atlas", "images": ["a.png"], "question": "<image>Colour?",
       "trajectory": "\\boxed{A}", "answer": "A"},
      _chat("chat", images=[standard]),
      {"id": "llava", "image": "a.png", "conversations": [
          {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]},
      {"id": "rl", "problem": "<image>Colour?", "answer": "A", "images": [urlsafe],
       "response": "\\boxed{A}"},
      _chat("twice", images=["a.png", "a.png"], question="<image> and <image>: same?")]))
  report = _build(tmp_path, {"train": crlf, "single": single, "mixed": mixed})
  assert report["counts"] == {"train": 3, "single": 1, "mixed": 5}
  assert all(not s for s in report["skipped"].values())
  rows, _ = _batches_by_id(report, "mixed", tok)
  with open(tmp_path / "a.png", "rb") as f:
    a = f.read()
  for rid, blobs in {"atlas": [a], "chat": [png], "llava": [a], "rl": [png],
                     "twice": [a, a]}.items():
    _assert_as_transformers(rows[rid], blobs)
  _, _, b, i = rows["chat"]
  target = tok.decode(b["input_ids"][i][b["loss_mask"][i] == 1])
  assert target == "\\boxed{A}<|im_end|>"
  for split, ids in (("train", {"w0", "w1", "w2"}), ("single", {"alone"})):
    assert set(_batches_by_id(report, split, tok)[0]) == ids
