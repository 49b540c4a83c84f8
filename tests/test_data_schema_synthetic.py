"""Trajectory schema validation and the synthetic task suite."""

import collections
import filecmp
import json
import os

import numpy as np
import pytest

from atlas_jax import functional_tokens
from atlas_jax.data import formats, schema, synthetic
from atlas_jax.answers import extract_boxed

GOOD = {"id": "a1", "images": [], "question": "Q?", "trajectory": "Look.\n<|Shape|>\n\\boxed{B}",
        "answer": "B", "task": "region", "answer_type": "choice", "choices": ["x", "y"]}


def _write(tmp_path, lines):
  path = tmp_path / "t.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_valid_records_round_trip(tmp_path):
  from PIL import Image
  Image.new("RGB", (56, 56), "red").save(tmp_path / "img.png")
  rec = dict(GOOD, images=["img.png"])
  records, skipped = formats.read_jsonl(_write(tmp_path, [json.dumps(rec)]))
  assert not skipped and len(records) == 1
  r = records[0]
  assert r.images == (str(tmp_path / "img.png"),) and r.choices == ("x", "y")
  out = tmp_path / "out" / "copy.jsonl"
  out.parent.mkdir()
  schema.write_jsonl(str(out), records)
  again, _ = formats.read_jsonl(str(out))
  assert again == records


def test_each_bad_reason_is_skipped_and_counted(tmp_path):
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
  lines = [json.dumps(GOOD),
           "{not json",
           json.dumps({k: v for k, v in GOOD.items() if k != "answer"} | {"id": "b"}),
           json.dumps(dict(GOOD, id="c", images="img.png")),
           json.dumps(dict(GOOD, id="d", images=["nowhere.png"])),
           json.dumps(dict(GOOD, id="e", images=["corrupt.png"])),
           json.dumps(dict(GOOD, id="f", trajectory="x <|Foo|> \\boxed{A}")),
           json.dumps(dict(GOOD, id="g"))]
  records, skipped = formats.read_jsonl(_write(tmp_path, lines))
  assert [r.id for r in records] == ["a1", "g"]
  assert skipped == collections.Counter(malformed_json=1, missing_field=1, bad_field_type=1,
                                        missing_image=1, corrupt_image=1,
                                        unknown_special_token=1)


def test_images_the_preprocessing_cannot_take_are_refused_by_reason(tmp_path):
  import io
  from PIL import Image

  def png(size, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()
  assert schema.check_image(png((112, 84))) == (84, 112)
  assert schema.check_image(png((60, 60), "I;16")) == (56, 56)
  cases = {"extreme_aspect_ratio": png((2, 600)), "corrupt_image": b"GIF89a\x00",
           "unusable_image": b""}
  for reason, data in cases.items():
    with pytest.raises(schema.BadRecord) as e:
      schema.check_image(data)
    assert e.value.reason == reason
  rec = schema.Trajectory(id="x", images=(png((112, 112)),) * 2, question="Q", trajectory="",
                          answer="A")
  assert len(schema.load_images(rec)) == 2
  for limits, reason in (({"max_images": 1}, "too_many_images"),
                         ({"max_patches": 100}, "too_many_patches")):
    with pytest.raises(schema.BadRecord) as e:
      schema.load_images(rec, **limits)
    assert e.value.reason == reason


def test_undecodable_line_and_duplicate_id_are_counted(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n'
                   + json.dumps(GOOD).encode() + b"\n")
  records, skipped = formats.read_jsonl(str(path))
  assert len(records) == 1 and skipped == {"undecodable_bytes": 1, "duplicate_id": 1}


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
    formats.read_jsonl(str(tmp_path / "nope.jsonl"))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  out = tmp_path_factory.mktemp("suite")
  path = synthetic.generate_suite(str(out), n_per_family=6, seed=1)
  return str(out), path


def test_suite_is_deterministic(suite, tmp_path):
  out, path = suite
  again = synthetic.generate_suite(str(tmp_path), n_per_family=6, seed=1)
  assert filecmp.cmp(path, again, shallow=False)
  for name in sorted(os.listdir(os.path.join(out, "images")))[:10]:
    assert filecmp.cmp(os.path.join(out, "images", name), tmp_path / "images" / name,
                       shallow=False)
  other = synthetic.generate_suite(str(tmp_path / "test"), n_per_family=6, seed=1, split="test")
  ids = {json.loads(l)["id"] for l in open(path)}
  assert not ids & {json.loads(l)["id"] for l in open(other)}


def test_suite_records_are_valid_and_consistent(suite):
  _, path = suite
  records, skipped = formats.read_jsonl(path)
  assert not skipped and len(records) == 6 * len(synthetic.FAMILIES)
  for r in records:
    token = functional_tokens.TASK_TOKENS[r.task]
    assert f"\n{token}\n" in r.trajectory
    assert extract_boxed(r.trajectory) == r.answer
    assert r.answer in "ABCD" and len(r.choices) == 4
    from PIL import Image
    with Image.open(r.images[0]) as img:
      assert img.width % 28 == 0 and img.height % 28 == 0
      assert 56 <= min(img.size) and max(img.size) <= 168


def _pixels(img, name):
  """Pixels of one suite colour (exact fill; anti-aliasing is off in PIL's draw)."""
  arr = np.asarray(img).astype(int)
  return np.argwhere((np.abs(arr - synthetic.COLORS[name]).sum(-1) < 10))


@pytest.mark.parametrize("family", sorted(synthetic.FAMILIES))
def test_answers_are_balanced_and_correct(family):
  """The gold colour is the one the picture shows to satisfy the question, checked on the
  drawn pixels; exactly two colours are drawn; options are the colours in fixed order."""
  rng = np.random.default_rng(0)
  letters = collections.Counter()
  for _ in range(200):
    img, rec, meta = synthetic.generate(family, rng)
    letters[rec["answer"]] += 1
    assert rec["choices"] == list(synthetic.COLORS)
    gold = rec["choices"]["ABCD".index(rec["answer"])]
    drawn = [c for c in synthetic.COLORS if len(_pixels(img, c))]
    assert len(drawn) == 2 and gold in drawn
    other = next(c for c in drawn if c != gold)
    g, o = _pixels(img, gold), _pixels(img, other)
    if family == "line_length":
      extent = lambda p: p[:, 1].max() - p[:, 1].min()
      assert extent(g) >= 1.5 * extent(o)
    elif family == "count":
      assert meta["counts"][gold] >= 2 * meta["counts"][other]
      assert len(g) > len(o)
    elif family == "region":
      # A triangle covers about half of its box; a circle about 79%.
      fill = lambda p: len(p) / ((np.ptp(p[:, 0]) + 1) * (np.ptp(p[:, 1]) + 1))
      assert fill(g) < 0.6 < fill(o)
    elif family == "relation":
      assert g[:, 0].max() < o[:, 0].min()  # entirely above
    elif family == "mirror":
      assert g[:, 1].min() > 56 > o[:, 1].max()  # gold is on the right before the flip
  assert max(letters.values()) / 200 < 0.4 and len(letters) == 4
