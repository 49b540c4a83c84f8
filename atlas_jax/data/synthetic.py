"""A procedurally drawn visual-reasoning suite, one task family per functional token.

Every example is a small image (sides multiples of 28, so the vision tower sees few
patches), a four-option multiple-choice question whose options come in a fixed canonical
order (colours, counts 1-4, quadrants, directions), the gold letter, and an ATLAS-style
trajectory: a sentence saying what the operation is about, the functional token on its
own line, the visual fact that decides the question, and `\\boxed{letter}`. Generation is
deterministic by seed; the correct letter is uniform over A-D in every family.

  family        token        question
  line_length   <|Line|>     which coloured segment is longest
  count         <|Text|>     how many red circles (1-4, among blue squares)
  region        <|Shape|>    which quadrant holds the triangle
  relation      <|Arrow|>    where the blue square is relative to the red circle
  mirror        <|Manip|>    which colour is on the left after a left-right flip

Canonical option order keeps each family's answer a function of what the picture shows,
so a model the size of the demo's learns perception, not option lookup, in minutes.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from atlas_jax.data import schema

LETTERS = "ABCD"
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (20, 160, 60),
          "orange": (240, 140, 0)}


def _options(choices) -> str:
  return " ".join(f"({l}) {c}" for l, c in zip(LETTERS, choices))


def _record(question, choices, answer_index, sentence, token, fact, task):
  letter = LETTERS[answer_index]
  trajectory = f"{sentence}\n{token}\n{fact} Therefore the answer is \\boxed{{{letter}}}."
  return {"question": f"{question} Options: {_options(choices)}", "trajectory": trajectory,
          "answer": letter, "task": task, "answer_type": "choice", "choices": list(choices)}


def line_length(rng: np.random.Generator):
  size = 112
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  names = list(COLORS)  # options in the canonical colour order; rows drawn in random order
  rows = rng.permutation(4)
  longest = int(rng.integers(4))
  lengths = rng.integers(25, 55, 4)
  lengths[longest] = int(rng.integers(75, 96))  # clearly the longest (>= 1.36x)
  for name, row, length in zip(names, rows, lengths):
    y = 14 + int(row) * 26
    x0 = int(rng.integers(6, size - 6 - length + 1))
    d.line([(x0, y), (x0 + int(length), y)], fill=COLORS[name], width=4)
  rec = _record("Which segment is longest?", names, longest,
                "I will draw a guide line along each segment to compare their lengths.",
                "<|Line|>", f"The {names[longest]} segment is the longest.", "line_length")
  return img, rec, {"lengths": lengths.tolist(), "colors": names, "rows": rows.tolist()}


def _place(rng, boxes, size, r, margin=4):
  for _ in range(200):
    x, y = (int(v) for v in rng.integers(margin + r, size - margin - r, 2))
    if all(abs(x - bx) > 2 * r + 3 or abs(y - by) > 2 * r + 3 for bx, by in boxes):
      boxes.append((x, y))
      return x, y
  raise RuntimeError("could not place an object without overlap")


def count(rng: np.random.Generator):
  size, r = 112, 8
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  answer_index = int(rng.integers(4))
  n = answer_index + 1  # options are 1-4 in order
  boxes: list = []
  for _ in range(n):
    x, y = _place(rng, boxes, size, r)
    d.ellipse([x - r, y - r, x + r, y + r], fill=COLORS["red"])
  for _ in range(int(rng.integers(1, 4))):  # distractors: blue squares
    x, y = _place(rng, boxes, size, r)
    d.rectangle([x - r, y - r, x + r, y + r], fill=COLORS["blue"])
  rec = _record("How many red circles are there?", ["1", "2", "3", "4"], answer_index,
                "I will number each red circle.", "<|Text|>",
                f"There are {n} red circles.", "count")
  return img, rec, {"count": n}


QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def region(rng: np.random.Generator):
  size = 112
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  d.line([(size // 2, 0), (size // 2, size)], fill="black", width=2)
  d.line([(0, size // 2), (size, size // 2)], fill="black", width=2)
  q = int(rng.integers(4))
  half = size // 2
  cx = (q % 2) * half + int(rng.integers(14, half - 14))
  cy = (q // 2) * half + int(rng.integers(14, half - 14))
  d.polygon([(cx, cy - 9), (cx - 9, cy + 8), (cx + 9, cy + 8)], fill=COLORS["green"])
  for other in range(4):  # distractor circles in other quadrants
    if other != q and rng.random() < 0.6:
      ox = (other % 2) * half + int(rng.integers(12, half - 12))
      oy = (other // 2) * half + int(rng.integers(12, half - 12))
      d.ellipse([ox - 6, oy - 6, ox + 6, oy + 6], fill=COLORS["orange"])
  rec = _record("Which quadrant contains the green triangle?", list(QUADRANTS), q,
                "I will outline the quadrant that holds the green triangle.", "<|Shape|>",
                f"The triangle is in the {QUADRANTS[q]} quadrant.", "region")
  return img, rec, {"center": (cx, cy)}


RELATIONS = ("left of", "right of", "above", "below")


def relation(rng: np.random.Generator):
  size, r = 112, 9
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  k = int(rng.integers(4))
  cx, cy = (int(v) for v in rng.integers(40, 72, 2))
  gap = int(rng.integers(28, 36))
  jitter = int(rng.integers(-6, 7))
  sx, sy = {0: (cx - gap, cy + jitter), 1: (cx + gap, cy + jitter),
            2: (cx + jitter, cy - gap), 3: (cx + jitter, cy + gap)}[k]
  d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS["red"])
  d.rectangle([sx - r, sy - r, sx + r, sy + r], fill=COLORS["blue"])
  direction = ("left", "right", "up", "down")[k]
  rec = _record("Where is the blue square relative to the red circle?", list(RELATIONS), k,
                "I will draw an arrow from the red circle to the blue square.", "<|Arrow|>",
                f"The arrow points {direction}, so the square is {RELATIONS[k]} the circle.",
                "relation")
  return img, rec, {"circle": (cx, cy), "square": (sx, sy)}


def mirror(rng: np.random.Generator):
  size, r = 112, 16
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  names = list(COLORS)
  left, right = (names[int(i)] for i in rng.choice(4, 2, replace=False))
  d.line([(size // 2, 0), (size // 2, size)], fill="black", width=2)
  for name, x in ((left, int(rng.integers(6 + r, size // 2 - 4 - r))),
                  (right, int(rng.integers(size // 2 + 4 + r, size - 6 - r)))):
    y = int(rng.integers(6 + r, size - 6 - r))
    d.rectangle([x - r, y - r, x + r, y + r], fill=COLORS[name])
  answer_index = names.index(right)
  rec = _record("After flipping the picture from left to right, which colour is on the left?",
                names, answer_index, "I will flip the picture from left to right.", "<|Manip|>",
                f"After the flip the {right} square is on the left.", "mirror")
  return img, rec, {"left": left, "right": right}


FAMILIES = {"line_length": line_length, "count": count, "region": region,
            "relation": relation, "mirror": mirror}
TASK_TOKENS = {"line_length": "<|Line|>", "count": "<|Text|>", "region": "<|Shape|>",
               "relation": "<|Arrow|>", "mirror": "<|Manip|>"}


def generate(family: str, rng: np.random.Generator):
  """(PIL image, record fields, ground-truth metadata) of one example."""
  if family not in FAMILIES:
    raise ValueError(f"unknown synthetic family {family!r}; expected one of {sorted(FAMILIES)}")
  return FAMILIES[family](rng)


def _rng(seed: int, family: str, split: str) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(
      [seed, zlib.crc32(family.encode()), zlib.crc32(split.encode())]))


def generate_suite(out_dir: str, *, n_per_family: int, seed: int, families=None,
                   split: str = "train") -> str:
  """Writes `<out_dir>/<split>.jsonl` and its PNGs under `<out_dir>/images/`; returns the
  JSONL path. Families are interleaved; the same arguments give identical bytes."""
  families = list(families or FAMILIES)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rngs = {f: _rng(seed, f, split) for f in families}
  records = []
  for i in range(n_per_family):
    for family in families:
      img, fields, _ = generate(family, rngs[family])
      rid = f"{family}-{split}-s{seed}-{i:06d}"
      rel = os.path.join("images", rid + ".png")
      img.save(os.path.join(out_dir, rel), format="PNG")
      records.append(dict(fields, id=rid, images=[rel]))
  path = os.path.join(out_dir, f"{split}.jsonl")
  schema.write_jsonl(path, records)
  return path
