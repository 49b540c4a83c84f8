"""A procedurally drawn visual-reasoning suite, one task family per functional token.

Every example is a small image (112x112, so the vision tower sees 16 merged tokens) with
two objects of two different colours, a question whose four options are the colour names
in a fixed order, the gold letter, and an ATLAS-style trajectory: a sentence saying what
the operation is about, the functional token on its own line, the visual fact that decides
the question, and `\\boxed{letter}`. Generation is deterministic by seed; the answer is
uniform over the colours (so over A-D) in every family.

  family        token        question: which colour is ...
  line_length   <|Line|>     the longer of two segments (>= 1.6x)
  count         <|Text|>     the colour with more dots (4-6 against 1-2)
  region        <|Shape|>    the triangle (next to a circle)
  relation      <|Arrow|>    the upper of two squares
  mirror        <|Manip|>    on the left after a left-right flip (two squares)

Seeing which two colours are present is half of every question; the other half is the
comparison the functional token names. Sized so that the demo's tiny model learns it on a
CPU in minutes.

`generate_suite`'s style options (`SuiteStyle`) make a sparse-token variant for the
ablation (atlas_jax/ablate.py): only a share of the trajectories keep a functional token
(some of them another family's), and filler sentences lengthen every trajectory. They draw
from their own generator, so the images and answers are those of the plain suite, and the
default style writes the plain suite byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

from atlas_jax.data import schema
from atlas_jax.functional_tokens import TASK_TOKENS

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


def _pair(rng):
  """Two distinct colour names, and the canonical option list."""
  names = list(COLORS)
  a, b = (names[int(i)] for i in rng.choice(4, 2, replace=False))
  return a, b, names


def line_length(rng: np.random.Generator):
  size = 112
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  long_name, short_name, names = _pair(rng)
  long_len, short_len = int(rng.integers(72, 97)), int(rng.integers(20, 45))  # >= 1.6x
  rows = rng.permutation([24, 80])
  lengths = {}
  for name, length, y in ((long_name, long_len, rows[0]), (short_name, short_len, rows[1])):
    y = int(y) + int(rng.integers(-8, 9))
    x0 = int(rng.integers(6, size - 6 - length + 1))
    d.line([(x0, y), (x0 + length, y)], fill=COLORS[name], width=4)
    lengths[name] = length
  rec = _record("Which colour is the longest segment?", names, names.index(long_name),
                "I will draw a guide line along each segment to compare their lengths.",
                "<|Line|>", f"The {long_name} segment is the longest.", "line_length")
  return img, rec, {"lengths": lengths}


def _place(rng, boxes, size, r, margin=4):
  for _ in range(200):
    x, y = (int(v) for v in rng.integers(margin + r, size - margin - r, 2))
    if all(abs(x - bx) > 2 * r + 3 or abs(y - by) > 2 * r + 3 for bx, by in boxes):
      boxes.append((x, y))
      return x, y
  raise RuntimeError("could not place an object without overlap")


def count(rng: np.random.Generator):
  size, r = 112, 7
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  many_name, few_name, names = _pair(rng)
  many, few = int(rng.integers(4, 7)), int(rng.integers(1, 3))
  boxes: list = []
  for name, n in ((many_name, many), (few_name, few)):
    for _ in range(n):
      x, y = _place(rng, boxes, size, r)
      d.ellipse([x - r, y - r, x + r, y + r], fill=COLORS[name])
  rec = _record("Which colour has the most dots?", names, names.index(many_name),
                "I will number the dots of each colour.", "<|Text|>",
                f"There are {many} {many_name} dots and {few} {few_name} dots.", "count")
  return img, rec, {"counts": {many_name: many, few_name: few}}


def region(rng: np.random.Generator):
  size, r = 112, 14
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  tri_name, circle_name, names = _pair(rng)
  boxes: list = []
  tx, ty = _place(rng, boxes, size, r)
  cx, cy = _place(rng, boxes, size, r)
  d.polygon([(tx, ty - r), (tx - r, ty + r), (tx + r, ty + r)], fill=COLORS[tri_name])
  d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[circle_name])
  rec = _record("Which colour is the triangle?", names, names.index(tri_name),
                "I will outline the triangle.", "<|Shape|>",
                f"The outlined triangle is {tri_name}.", "region")
  return img, rec, {"triangle": (tx, ty, tri_name), "circle": (cx, cy, circle_name)}


def relation(rng: np.random.Generator):
  size, r = 112, 12
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  top_name, bottom_name, names = _pair(rng)
  x_top, x_bottom = (int(v) for v in rng.integers(6 + r, size - 6 - r, 2))
  y_top = int(rng.integers(6 + r, 40))
  y_bottom = int(rng.integers(y_top + 2 * r + 16, size - 6 - r + 1))
  for name, x, y in ((top_name, x_top, y_top), (bottom_name, x_bottom, y_bottom)):
    d.rectangle([x - r, y - r, x + r, y + r], fill=COLORS[name])
  rec = _record("Which colour is the square above the other one?", names,
                names.index(top_name), "I will draw an arrow from the lower square upwards.",
                "<|Arrow|>", f"The arrow points up to the {top_name} square.", "relation")
  return img, rec, {"top": (x_top, y_top, top_name), "bottom": (x_bottom, y_bottom, bottom_name)}


def mirror(rng: np.random.Generator):
  size, r = 112, 16
  img = Image.new("RGB", (size, size), "white")
  d = ImageDraw.Draw(img)
  right, left, names = _pair(rng)
  d.line([(size // 2, 0), (size // 2, size)], fill="black", width=2)
  for name, x in ((left, int(rng.integers(6 + r, size // 2 - 4 - r))),
                  (right, int(rng.integers(size // 2 + 4 + r, size - 6 - r)))):
    y = int(rng.integers(6 + r, size - 6 - r))
    d.rectangle([x - r, y - r, x + r, y + r], fill=COLORS[name])
  rec = _record("After flipping the picture from left to right, which colour is on the left?",
                names, names.index(right), "I will flip the picture from left to right.",
                "<|Manip|>", f"After the flip the {right} square is on the left.", "mirror")
  return img, rec, {"left": left, "right": right}


FAMILIES = {"line_length": line_length, "count": count, "region": region,
            "relation": relation, "mirror": mirror}


def generate(family: str, rng: np.random.Generator):
  """(PIL image, record fields, ground-truth metadata) of one example."""
  if family not in FAMILIES:
    raise ValueError(f"unknown synthetic family {family!r}; expected one of {sorted(FAMILIES)}")
  return FAMILIES[family](rng)


# Filler sentences of the sparse style: true of every picture, committing to no answer.
FILLER = ("Let me focus on the picture.", "Which option is correct?",
          "I will compare each option with the picture.", "Each option is a colour.",
          "Then I check the colour of each object.", "Now I look at the question again.",
          "The answer is one of the four options.", "First I read the options.")


@dataclasses.dataclass(frozen=True)
class SuiteStyle:
  """How trajectories are written (the default: every one with its family's token).

  token_rate: share of trajectories that keep a functional-token line (the others go
    from the operation sentence straight to the fact).
  wrong_token_rate: share of those whose token is another family's.
  filler_sentences: sentences from `FILLER` added to every trajectory, the same ones to
    every trajectory of a family (text the model can learn, as most of a real trajectory
    is), the first half (rounded up) before the operation sentence, the rest after the
    fact. Measured: with fillers drawn at random per trajectory, the demo's SFT stage ended
    at chance (0.28 held-out accuracy), their irreducible loss drowning the image's.
  """

  token_rate: float = 1.0
  wrong_token_rate: float = 0.0
  filler_sentences: int = 0

  def __post_init__(self):
    for name in ("token_rate", "wrong_token_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"SuiteStyle.{name} {getattr(self, name)!r} must be in [0, 1]")
    if self.filler_sentences < 0:
      raise ValueError(f"SuiteStyle.filler_sentences {self.filler_sentences!r} must be >= 0")

  @property
  def plain(self) -> bool:
    return self == SuiteStyle()


def restyle(record: dict, style: SuiteStyle, rng: np.random.Generator) -> dict:
  """The record with its trajectory rewritten in `style` (drawn from `rng`)."""
  sentence, token, fact = record["trajectory"].split("\n")
  fact, answer = fact.split(" Therefore ")
  keep = rng.random() < style.token_rate
  if keep and rng.random() < style.wrong_token_rate:
    others = [t for t in TASK_TOKENS.values() if t != token]
    token = others[int(rng.integers(len(others)))]
  family = list(FAMILIES).index(record["task"])
  filler = [FILLER[(family * style.filler_sentences + j) % len(FILLER)]
            for j in range(style.filler_sentences)]
  half = (len(filler) + 1) // 2
  lines = [" ".join(filler[:half] + [sentence])] + ([token] if keep else [])
  lines.append(" ".join([fact] + filler[half:] + ["Therefore " + answer]))
  return dict(record, trajectory="\n".join(lines))


def _rng(seed: int, family: str, split: str) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(
      [seed, zlib.crc32(family.encode()), zlib.crc32(split.encode())]))


def generate_suite(out_dir: str, *, n_per_family: int, seed: int, families=None,
                   split: str = "train", style: SuiteStyle = SuiteStyle()) -> str:
  """Writes `<out_dir>/<split>.jsonl` and its PNGs under `<out_dir>/images/`; returns the
  JSONL path. Families are interleaved; the same arguments give identical bytes. A style
  other than the default rewrites the trajectories (`restyle`, from a generator of its own:
  images and answers stay those of the default style)."""
  families = list(families or FAMILIES)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  rngs = {f: _rng(seed, f, split) for f in families}
  style_rngs = {f: _rng(seed, f, split + "/style") for f in families}
  records = []
  for i in range(n_per_family):
    for family in families:
      img, fields, _ = generate(family, rngs[family])
      if not style.plain:
        fields = restyle(fields, style, style_rngs[family])
      rid = f"{family}-{split}-s{seed}-{i:06d}"
      rel = os.path.join("images", rid + ".png")
      img.save(os.path.join(out_dir, rel), format="PNG")
      records.append(dict(fields, id=rid, images=[rel]))
  path = os.path.join(out_dir, f"{split}.jsonl")
  schema.write_jsonl(path, records)
  return path
