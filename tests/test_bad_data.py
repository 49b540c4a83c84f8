"""A data file with one of every bad kind trains to completion, each reason counted once;
a changed source is detected on relaunch; TFDS's own messages are replaced by ours."""

import collections
import json
import os
import struct
import zlib

import pytest
from PIL import Image

from atlas_jax.data import formats, synthetic
from atlas_jax import config as config_lib
from atlas_jax.run import setup
from atlas_jax.sft.loop import train_sft
from configs import sft as sft_config
from tests import factories


def _png_header(w, h):
  """A PNG whose header claims w x h (no real pixel data needed to be refused)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# reason -> how many records of that kind the fuzzed file has
EXPECTED_BUILD = {"undecodable_bytes": 2, "invalid_text": 3, "malformed_json": 3,
                  "unknown_format": 1, "missing_field": 1, "bad_field_type": 5,
                  "duplicate_id": 1, "unknown_special_token": 1, "image_count_mismatch": 1,
                  "missing_image": 1, "corrupt_image": 1, "not_a_regular_file": 2,
                  "image_too_large": 2, "extreme_aspect_ratio": 1, "unusable_image": 1,
                  "too_many_images": 1, "too_many_patches": 1}
EXPECTED_PIPELINE = {"too_long": 1}
GOOD = 20 + 4  # the suite's records + the odd-mode images
BUILT = GOOD + 1  # and the one that is too long once rendered


def fuzz_file(root) -> str:
  """The synthetic suite (20 records) with every kind of bad record mixed in."""
  path = synthetic.generate_suite(os.path.join(root, "raw"), n_per_family=4, seed=0)
  images = os.path.join(root, "raw", "images")
  lines = [l.encode() for l in open(path, encoding="utf-8").read().splitlines()]
  good = json.loads(lines[0])
  img = good["images"][0]

  def rec(rid, **changes):
    return json.dumps(dict(good, id=rid, **changes), ensure_ascii=False).encode()

  def image(name, data=None, size=None, mode="RGB", fmt="PNG"):
    p = os.path.join(images, name)
    if data is not None:
      open(p, "wb").write(data)
    else:
      Image.new(mode, size, 1).save(p, fmt)
    return "images/" + name

  bad = [
      rec("utf8", question="caf\xe9?").replace(b"caf\xc3\xa9", b"caf\xe9"),
      b'{"id": "utf8-key\xff", "x": 1}',
      b"{not json",
      json.dumps({k: v for k, v in good.items() if k != "answer"} | {"id": "noans"}).encode(),
      rec("badtype", images=img),
      rec(good["id"]),  # duplicate
      rec("unk", trajectory="x <|Foo|> \\boxed{A}"),
      rec("placeholders", question="<image> and <image>?"),
      rec("missing", images=["images/none.png"]),
      rec("corrupt", images=[image("corrupt.png", b"\x89PNG\r\n\x1a\n garbage")]),
      rec("bomb", images=[image("bomb.png", _png_header(20000, 20000))]),
      rec("big", images=[image("big.png", _png_header(12000, 9000))]),
      rec("thin", images=[image("thin.png", size=(2, 600))]),
      rec("empty", images=[image("empty.png", b"")]),
      rec("two", images=[img, img]),
      rec("patches", images=[image("wide.png", size=(5600, 28))]),
      rec("long", question="why " * 400),
      rec("cmyk", images=[image("cmyk.tiff", size=(112, 112), mode="CMYK", fmt="TIFF")]),
      rec("i16", images=[image("i16.png", size=(112, 84), mode="I;16")]),
      rec("la", images=[image("la.png", size=(84, 112), mode="LA")]),
      rec("pal", images=[image("pal.png", size=(112, 112), mode="P")]),
  ]
  # Records that ended the build before round two (issue 27), each now counted.
  os.mkfifo(os.path.join(images, "fifo.png"))
  os.mkdir(os.path.join(images, "folder.png"))
  chat = lambda rid, **kw: json.dumps(dict({"id": rid, "images": [img], "messages": [
      {"role": "user", "content": "<image>Which?"},
      {"role": "assistant", "content": "\\boxed{A}"}]}, **kw)).encode()
  bad += [
      chat("role-list", messages=[{"role": ["user"], "content": "<image>Q"}]),
      chat("bytes-text", images=[{"bytes": ["iVBO", "Rw0K"]}]),
      chat("bytes-300", images=[{"bytes": [137, 80, 300]}]),
      rec("path-nul", images=["images/a\0.png"]),
      json.dumps(dict(good, id="path-surrogate", images=["images/\udc80.png"])).encode(),
      json.dumps(dict(good, id="text-surrogate", question="caf\udce9?")).encode(),
      json.dumps(dict(good, id="id-\ud800")).encode(),
      b'{"id": "long-int", "n": ' + b"7" * 5000 + b"}",
      b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
      rec("fifo", images=["images/fifo.png"]),
      rec("folder", images=["images/folder.png"]),
  ]
  out = os.path.join(root, "raw", "fuzzed.jsonl")
  with open(out, "wb") as f:
    unknown = json.dumps({"foo": 1, "bar": 2}).encode()  # first: no format detected yet
    f.write(b"\n".join([unknown] + lines[:5] + bad[:9] + lines[5:12] + bad[9:] + lines[12:])
            + b"\n")
  return out


def _config(tmp, train_jsonl, **changes):
  c = sft_config.get_config("tiny")
  c.data.train_jsonl = train_jsonl
  c.data.batch_size = 4
  c.data.max_length = 192
  c.data.length_buckets = (128, 192)
  c.train.logprob_chunk = 64
  c.train.log_every = 3
  c.checkpoint.every = 100
  c.checkpoint.async_save = False
  c.data.dataset_dir = os.path.join(tmp, "data")
  return factories.override(c, changes)


def test_reader_counts_every_kind(tmp_path):
  path = fuzz_file(str(tmp_path))
  records, skipped = formats.read_jsonl(path)
  assert len(records) == GOOD + 3  # two, patches, long: fine without the config's limits
  expected = {k: v for k, v in EXPECTED_BUILD.items()
              if k not in ("too_many_images", "too_many_patches")}
  assert skipped == collections.Counter(expected)


@pytest.mark.slow
def test_fuzzed_file_trains_to_completion_and_reports_reasons(tmp_path, capsys):
  path = fuzz_file(str(tmp_path))
  work = str(tmp_path / "run")
  steps = 8  # 32 rows: more than one epoch of the 24 good records
  state, last, run = train_sft(_config(str(tmp_path), path, **{"train.steps": steps}), work)
  assert int(state.step) == steps and last
  out = capsys.readouterr().out
  assert "[data] built train=25 in" in out and "Downloading and preparing" not in out
  assert "downloaded and prepared" not in out
  report = run.data_report
  assert report["counts"] == {"train": BUILT}
  assert report["skipped"]["train"] == EXPECTED_BUILD
  rows = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  texts = {r["text"]: r["value"] for r in rows if "text" in r}
  assert texts["skipped_records"] == "skipped 1 records: too_long=1"  # once, over 2 epochs
  for reason, n in EXPECTED_BUILD.items():
    assert f"'{reason}': {n}" in texts["data"]
  print("\n[bad data] build: " + ", ".join(f"{k}={v}" for k, v in sorted(EXPECTED_BUILD.items()))
        + "; pipeline: " + texts["skipped_records"])


def test_changed_source_is_detected_on_relaunch(tmp_path, capsys):
  path = fuzz_file(str(tmp_path))
  work = str(tmp_path / "run")
  c = _config(str(tmp_path), path)
  first = setup.prepare_data(c, work)
  assert first["counts"] == {"train": BUILT}
  assert setup.prepare_data(c, work) == first  # unchanged: reused
  assert "[data] reusing" in capsys.readouterr().out
  good = json.loads(open(path, "rb").read().splitlines()[1])
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(dict(good, id="added")) + "\n")
  strict = _config(str(tmp_path), path, **{"data.on_source_change": "error"})
  with pytest.raises(ValueError, match=f"{path} changed since the build"):
    setup.prepare_data(strict, work)
  again = setup.prepare_data(c, work)
  assert again["counts"] == {"train": BUILT + 1}
  assert "changed since the build (size" in capsys.readouterr().out
  # An image changed in place, and a build option, are changes too.
  Image.new("RGB", (56, 56), "red").save(os.path.join(os.path.dirname(path), good["images"][0]))
  with pytest.raises(ValueError, match="image .* changed since the build"):
    setup.prepare_data(strict, work)
  setup.prepare_data(c, work)
  more = _config(str(tmp_path), path, **{"data.max_images": 2, "data.max_patches": 288,
                                         "data.on_source_change": "error"})
  with pytest.raises(ValueError, match="build options changed: max_images 1 -> 2"):
    setup.prepare_data(more, work)
  # Another file in the same data directory is a change as well.
  other = tmp_path / "other.jsonl"
  other.write_text(json.dumps(dict(good, images=[os.path.join(os.path.dirname(path),
                                                              good["images"][0])])) + "\n")
  assert setup.prepare_data(_config(str(tmp_path), str(other)), work)["counts"] == {"train": 1}


@pytest.mark.parametrize("field, value, message", [
    ("data.format", "csv", "config.data.format 'csv' is not one of"),
    ("data.on_source_change", "ignore", "config.data.on_source_change 'ignore' is not one of"),
    ("data.image_root", "/no/such/dir", "config.data.image_root '/no/such/dir' is not a"),
])
def test_bad_data_options_stop_before_any_work(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config(str(tmp_path), "", **{field: value}))


def test_regenerated_identical_suite_is_reused(tmp_path, capsys):
  """The synthetic suite is rewritten on every launch (new mtimes, same bytes): the
  hashes say nothing changed, so the dataset is reused."""
  c = _config(str(tmp_path), "", **{"data.synthetic_per_family": 2,
                                    "data.synthetic_test_per_family": 1})
  first = setup.prepare_data(c, str(tmp_path / "run"))
  assert setup.prepare_data(c, str(tmp_path / "run")) == first
  out = capsys.readouterr().out
  assert out.count("[data] built train=10 test=5") == 1 and "[data] reusing" in out
