"""Benchmark readers and prompts: small files in each format, built from drawn images."""

import base64
import io
import json

import pytest
from PIL import Image

from atlas_jax.eval import benchmarks, prompts, writers

TSV_HEADER = ["index", "image", "image_path", "question", "hint", "A", "B", "C", "D", "answer",
              "category", "l2-category", "split"]


def png(color, size=56) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), color).save(buf, format="PNG")
  return buf.getvalue()


def b64(color) -> str:
  return base64.b64encode(png(color)).decode()


def write_tsv(path, rows):
  lines = ["\t".join(TSV_HEADER)]
  for r in rows:
    lines.append("\t".join(str(r.get(k, "")) for k in TSV_HEADER))
  path.write_text("\n".join(lines) + "\n")


def vlmevalkit_tsv(tmp_path):
  """Seven rows: plain, index reuse, multi-image, image_path, and three bad ones."""
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "g.png").write_bytes(png("green"))
  rows = [
      dict(index=1, image=b64("red"), question="Which colour?", hint="Look closely.",
           A="red", B="blue", C="", D="nan", answer="A", category="Counting",
           **{"l2-category": "perception"}, split="dev"),
      dict(index=2, image="1", question="Again?", A="x", B="y", C="z", answer="C",
           category="Counting"),
      dict(index=3, image=repr([b64("red"), b64("blue")]), question="Same colours?",
           A="yes", B="no", answer="B", category="Jigsaw", **{"l2-category": "reasoning"}),
      dict(index=4, image_path="imgs/g.png", question="Colour?", A="green", B="red",
           answer="A", category="Art_Style"),
      dict(index=5, image="99", question="Lost?", A="a", B="b", answer="A"),  # no row 99
      dict(index=6, image=b64("red"), question="No answer?", A="a", B="b", answer=""),
      dict(index=7, image="[" + repr(b64("red")), question="Broken?", A="a", B="b", answer="A"),
  ]
  path = tmp_path / "bench.tsv"
  write_tsv(path, rows)
  return path


def test_vlmevalkit_tsv_rows_reuse_and_multi_image(tmp_path):
  items, skipped = benchmarks.read(str(vlmevalkit_tsv(tmp_path)))
  assert [i.id for i in items] == ["1", "2", "3", "4"]
  assert dict(skipped) == {"missing_image": 1, "missing_field": 1, "bad_field_type": 1}
  first, reuse, multi, by_path = items
  assert first.options == (("A", "red"), ("B", "blue"))  # empty and NaN options dropped
  assert first.hint == "Look closely." and first.category == "Counting"
  assert first.l2_category == "perception" and first.split == "dev"
  assert first.record.images == (png("red"),) and first.record.answer == "A"
  assert reuse.record.images == first.record.images  # "1": row 1's image
  assert multi.record.images == (png("red"), png("blue"))
  assert by_path.record.images == (str(tmp_path / "imgs" / "g.png"),)
  assert all(i.kind == "tsv" for i in items)


def test_vlmevalkit_prompts(tmp_path):
  first, reuse, *_ = benchmarks.read(str(vlmevalkit_tsv(tmp_path)))[0]
  assert prompts.build(first) == ("Hint: Look closely.\nQuestion: Which colour?\nOptions:\n"
                                  "A. red\nB. blue\n"
                                  "Please select the correct answer from the options above.")
  assert prompts.build(reuse, "boxed") == ("Question: Again?\nOptions:\nA. x\nB. y\nC. z\n"
                                           "Put the final answer in \\boxed{}.")
  assert prompts.build(first, "question") == "Which colour?\nPut the final answer in \\boxed{}."
  with pytest.raises(ValueError, match="prompt 'x' is not one of"):
    prompts.build(first, "x")


def _parquet(path, columns):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table(columns), str(path))
  return str(path)


def test_hf_parquet_blink_layout(tmp_path):
  img = lambda c: {"bytes": png(c), "path": f"{c}.png"}
  path = _parquet(tmp_path / "blink.parquet", {
      "idx": ["val_Jigsaw_1", "val_Counting_2"],
      "question": ["Which piece fits?", "How many?"],
      "sub_task": ["Jigsaw", "Counting"],
      "image_1": [img("red"), img("blue")],
      "image_2": [img("green"), None],
      "choices": [["(A) first", "(B) second"], ["2", "3", "4"]],
      "answer": ["(B)", "(A)"],
      "prompt": ["Which piece fits?\nSelect from the following choices.\n(A) first\n"
                 "(B) second", ""]})
  (jig, count), skipped = benchmarks.read(path)
  assert not skipped
  assert jig.record.images == (png("red"), png("green")) and count.record.images == (png("blue"),)
  assert jig.record.answer == "B" and count.record.answer == "A"
  assert count.options == (("A", "2"), ("B", "3"), ("C", "4")) and jig.category == "Jigsaw"
  assert prompts.build(jig) == jig.prompt  # the file's own prompt
  assert prompts.build(count) == ("How many?\nSelect from the following choices.\n(A) 2\n"
                                  "(B) 3\n(C) 4")
  assert prompts.build(count, "boxed").endswith("(C) 4\nPut the final answer in \\boxed{}.")


def test_hf_parquet_single_image_and_option_columns(tmp_path):
  path = _parquet(tmp_path / "mmstar.parquet", {
      "index": [0, 1], "image": [{"bytes": png("red"), "path": None}, {"bytes": None,
                                                                     "path": None}],
      "question": ["Colour?", "Broken?"], "A": ["red", "a"], "B": ["blue", "b"],
      "answer": ["A", "B"], "category": ["coarse perception"] * 2,
      "l2_category": ["image scene", "x"]})
  items, skipped = benchmarks.read(path)
  assert [i.id for i in items] == ["0"] and dict(skipped) == {"missing_image": 1}
  assert items[0].options == (("A", "red"), ("B", "blue"))
  assert items[0].l2_category == "image scene"


def test_jsonl_formats_and_inline_options(tmp_path):
  (tmp_path / "a.png").write_bytes(png("red"))
  rows = [{"id": "s1", "images": ["a.png"], "trajectory": "",
           "question": "Which colour? Options: (A) red (B) blue (C) green (D) orange",
           "answer": "A", "task": "count", "choices": ["red", "blue", "green", "orange"]},
          {"id": "s2", "images": ["a.png"], "trajectory": "", "question": "How many?",
           "answer": "3", "answer_type": "number"}]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  choice, number = benchmarks.read(str(tmp_path / "d.jsonl"))[0]
  assert choice.options[0] == ("A", "red") and choice.category == "count"
  assert number.options == () and number.record.answer == "3"
  assert prompts.build(choice, suffix="\nBOX") == rows[0]["question"] + "\nBOX"
  chat = {"messages": [{"role": "user", "content": "<image>Pick: (A) cat (B) dog"},
                       {"role": "assistant", "content": "\\boxed{B}"}], "images": ["a.png"]}
  (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n")
  [item], _ = benchmarks.read(str(tmp_path / "c.jsonl"))
  assert item.options == (("A", "cat"), ("B", "dog")) and item.record.answer == "B"


def test_writers_round_trip_every_format(tmp_path):
  items, _ = benchmarks.read(str(vlmevalkit_tsv(tmp_path)))
  writers.write_tsv(items, str(tmp_path / "out.tsv"))
  again, skipped = benchmarks.read(str(tmp_path / "out.tsv"))
  assert not skipped
  resolved = lambda i: tuple(r if isinstance(r, bytes) else open(r, "rb").read()
                             for r in i.record.images)
  for a, b in zip(items, again):
    assert (a.id, a.options, a.record.answer, resolved(a)) == \
        (b.id, b.options, b.record.answer, resolved(b))
  raw = (tmp_path / "out.tsv").read_text().splitlines()
  assert raw[2].split("\t")[1] == "1"  # row 2 reuses row 1's image by index
  pytest.importorskip("pyarrow")
  writers.write_parquet(items, str(tmp_path / "out.parquet"))
  again, _ = benchmarks.read(str(tmp_path / "out.parquet"))
  assert [(b.id, b.options, b.record.answer, resolved(b)) for b in again] == \
      [(a.id, a.options, a.record.answer, resolved(a)) for a in items]


def test_missing_file_and_bad_format():
  with pytest.raises(FileNotFoundError, match="benchmark file /nope.tsv does not exist"):
    benchmarks.read("/nope.tsv")
  with pytest.raises(ValueError, match="benchmark format 'csv' is not one of"):
    benchmarks.read("/nope.tsv", format="csv")
