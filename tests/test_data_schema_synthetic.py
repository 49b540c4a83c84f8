"""Trajectory schema validation and the synthetic task suite."""

import collections
import filecmp
import json
import os

import numpy as np
import pytest

from atlas_jax.data import schema, synthetic
from atlas_jax.rl.rewards import extract_boxed

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
  records, skipped = schema.read_jsonl(_write(tmp_path, [json.dumps(rec)]))
  assert not skipped and len(records) == 1
  r = records[0]
  assert r.images == (str(tmp_path / "img.png"),) and r.choices == ("x", "y")
  out = tmp_path / "out" / "copy.jsonl"
  out.parent.mkdir()
  schema.write_jsonl(str(out), records)
  again, _ = schema.read_jsonl(str(out))
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
  records, skipped = schema.read_jsonl(_write(tmp_path, lines))
  assert [r.id for r in records] == ["a1", "g"]
  assert skipped == collections.Counter(malformed_json=1, missing_field=1, bad_field_type=1,
                                        missing_image=1, corrupt_image=1,
                                        unknown_special_token=1)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
    schema.read_jsonl(str(tmp_path / "nope.jsonl"))


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
  records, skipped = schema.read_jsonl(path)
  assert not skipped and len(records) == 6 * len(synthetic.FAMILIES)
  for r in records:
    token = synthetic.TASK_TOKENS[r.task]
    assert f"\n{token}\n" in r.trajectory
    assert extract_boxed(r.trajectory) == r.answer
    assert r.answer in "ABCD" and len(r.choices) == 4
    from PIL import Image
    with Image.open(r.images[0]) as img:
      assert img.width % 28 == 0 and img.height % 28 == 0
      assert 56 <= min(img.size) and max(img.size) <= 168


CANONICAL = {"line_length": list(synthetic.COLORS), "mirror": list(synthetic.COLORS),
             "count": ["1", "2", "3", "4"], "region": list(synthetic.QUADRANTS),
             "relation": list(synthetic.RELATIONS)}


@pytest.mark.parametrize("family", sorted(synthetic.FAMILIES))
def test_answers_are_balanced_and_correct(family):
  rng = np.random.default_rng(0)
  letters = collections.Counter()
  for _ in range(200):
    img, rec, meta = synthetic.generate(family, rng)
    letters[rec["answer"]] += 1
    k = "ABCD".index(rec["answer"])
    if family == "count":
      assert rec["choices"][k] == str(meta["count"])
      arr = np.asarray(img).astype(int)
      red = (arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
      assert red.sum() > 100 * meta["count"]  # each circle is drawn (r=8: ~200 px)
    elif family == "line_length":
      lengths = meta["lengths"]
      assert lengths[k] >= 1.3 * max(l for i, l in enumerate(lengths) if i != k)
      assert rec["choices"][k] == meta["colors"][k]
    elif family == "relation":
      (cx, cy), (sx, sy) = meta["circle"], meta["square"]
      want = {0: sx < cx - 15, 1: sx > cx + 15, 2: sy < cy - 15, 3: sy > cy + 15}[k]
      assert want
    elif family == "region":
      cx, cy = meta["center"]
      assert k == (cx >= 56) + 2 * (cy >= 56)
    elif family == "mirror":
      assert meta["left"] != meta["right"] and rec["choices"][k] == meta["right"]
      arr = np.asarray(img).astype(int)
      right_half = arr[:, 58:].reshape(-1, 3)
      assert (np.abs(right_half - synthetic.COLORS[meta["right"]]).sum(1) < 10).sum() > 400
    assert rec["choices"] == sorted(rec["choices"], key=CANONICAL[family].index)
  assert max(letters.values()) / 200 < 0.4 and len(letters) == 4
