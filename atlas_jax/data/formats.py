"""Readers for the data formats users keep, each mapping a record into the trajectory
schema (`schema.Trajectory`), so SFT, RL and the TFDS/grain pipeline are unchanged.

  atlas  this project's JSONL (schema.py)
  chat   LLaMA-Factory sharegpt / ms-swift: {"messages": [{"role", "content"}], "images"},
         or {"conversations": [{"from": "human"|"gpt", "value"}]}, `<image>` anywhere
  llava  LLaVA / qwen-vl-finetune: {"image": "a.jpg" | [...], "conversations": [...]}
  rl     verl / EasyR1 / TRL prompt rows: a prompt ("problem" or "prompt", a string or chat
         messages), "images", and the gold "answer" | "solution" | reward_model.ground_truth

A file is a JSON list, one JSON object (pretty-printed or not), or one object per line
(.jsonl; CRLF line ends and a UTF-8 byte-order mark are fine); each record's format is
detected from its fields unless given, so one file may mix them (a record that shows no
format is read as the one before it was, to say what it lacks). Image references are paths
(absolute, relative to `image_root` or to the file), `data:` URIs or raw base64 strings
(standard or URL-safe, padding optional), or {"bytes": ..., "path": ...} dicts (verl, HF
datasets; bytes as base64 text or a list of 0-255 integers). Bad records come out as
`schema.BadRecord`, never raised; `read_jsonl` and `convert` count them by reason.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import io
import json
import os
import re
from typing import Iterable, Iterator

from atlas_jax.data import schema
from atlas_jax.data.schema import BadRecord, Trajectory
from atlas_jax.functional_tokens import FUNCTIONAL_TOKENS

FORMATS = ("auto", "atlas", "chat", "llava", "rl")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_BASE64 = re.compile(r"[A-Za-z0-9+/=_\-\s]+")  # a path has a '.' (its extension)
_URLSAFE = str.maketrans("-_", "+/")


def detect(d: dict) -> str | None:
  """The format whose fields an object has, or None."""
  if "trajectory" in d:
    return "atlas"
  if "conversations" in d and "image" in d:
    return "llava"
  if "messages" in d or "conversations" in d:
    return "chat"
  if ("prompt" in d or "problem" in d) and (
      "answer" in d or "solution" in d or "reward_model" in d):
    return "rl"
  return None


def _boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (nested braces kept), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 1, start + len("\\boxed{")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def _gold(value) -> str:
  """A gold answer as text: the last \\boxed{} or <answer>...</answer> if present."""
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise BadRecord("bad_field_type", f"gold answer is {type(value).__name__}, expected a "
                    "string or number")
  m = re.search(r"<answer>(.*?)</answer>", value, re.S)
  text = m.group(1) if m else value
  return (_boxed(text) or text).strip()


def _content(content) -> tuple[str, list]:
  """Message content (a string or a list of parts) -> (text with <image> placeholders,
  inline image references)."""
  if isinstance(content, str):
    return content, []
  if not isinstance(content, list):
    raise BadRecord("bad_field_type", f"message content is {type(content).__name__}, "
                    "expected a string or a list of parts")
  text, inline = [], []
  for part in content:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
      text.append(str(part.get("text", "")))
    elif kind in ("image", "image_url"):
      text.append(schema.IMAGE_PLACEHOLDER)
      ref = part.get("image") or part.get("image_url") or part.get("path")
      if isinstance(ref, dict):
        ref = ref.get("url") or ref
      if ref:
        inline.append(ref)
    else:
      raise BadRecord("bad_field_type", f"message part {part!r:.60} is not text or image")
  return "".join(text), inline


def _turns(messages, system: str | None):
  """Chat messages -> (system, [(user, assistant)] earlier turns, last user, last
  assistant or "", inline image refs)."""
  if not isinstance(messages, list) or not messages:
    raise BadRecord("missing_field", "no messages")
  turns, inline = [], []
  for m in messages:
    if not isinstance(m, dict):
      raise BadRecord("bad_field_type", "a message is not an object")
    role = m.get("role", m.get("from"))
    if not isinstance(role, str) or role not in ROLES:
      raise BadRecord("bad_field_type", f"message role {role!r} is not one of {sorted(ROLES)}")
    text, refs = _content(m.get("content", m.get("value", "")))
    turns.append((ROLES[role], text))
    inline += refs
  if turns[0][0] == "system":
    system = turns.pop(0)[1]
  roles = [r for r, _ in turns]
  if not roles or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
    raise BadRecord("bad_field_type", f"roles {roles} must alternate user, assistant")
  if roles[-1] == "user":
    turns.append(("assistant", ""))
  pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
  return system or None, tuple(pairs[:-1]), pairs[-1][0], pairs[-1][1], inline


def _image_ref(ref, base_dir: str, image_root: str) -> str | bytes:
  """A path (made absolute) or the decoded bytes of an embedded image."""
  if isinstance(ref, dict):
    if ref.get("bytes"):
      ref = ref["bytes"]
      if isinstance(ref, list):  # bytes serialised as a list of ints
        if not all(type(b) is int and 0 <= b < 256 for b in ref):
          raise BadRecord("bad_field_type", "image 'bytes' given as a list must hold integers "
                          "0-255")
        return bytes(ref)
      if not isinstance(ref, str):
        raise BadRecord("bad_field_type", "image 'bytes' must be base64 text")
      return _b64(ref)
    ref = ref.get("path") or ref.get("image") or ref.get("url")
  if not isinstance(ref, str) or not ref:
    raise BadRecord("bad_field_type", f"image reference {ref!r:.60} is not a path or bytes")
  if ref.startswith("data:"):
    return _b64(ref.partition(",")[2])
  if ref.startswith(("http://", "https://")):
    raise BadRecord("missing_image", f"{ref}: remote images are not fetched")
  if ref.startswith("file://"):
    ref = ref[len("file://"):]
  if len(ref) > 512 and _BASE64.fullmatch(ref):
    return _b64(ref)
  return schema.resolve_path(ref, base_dir, image_root)


def _b64(text: str) -> bytes:
  """Standard or URL-safe base64, whitespace ignored, padding optional."""
  text = "".join(text.split())
  if "-" in text or "_" in text:
    text = text.translate(_URLSAFE)
  text = text.rstrip("=")
  text += "=" * (-len(text) % 4)
  try:
    return base64.b64decode(text, validate=False)
  except (binascii.Error, ValueError) as e:
    raise BadRecord("corrupt_image", f"base64: {e}") from None


def _images(d: dict, inline: list, base_dir: str, image_root: str) -> tuple:
  refs = d.get("images", d.get("image"))
  if refs is None:
    refs = inline
  if isinstance(refs, (str, dict)):
    refs = [refs]
  if not isinstance(refs, list):
    raise BadRecord("bad_field_type", f"images is {type(refs).__name__}, expected a list")
  return tuple(_image_ref(r, base_dir, image_root) for r in refs)


def _optional(d: dict):
  choices = d.get("choices")
  if choices is not None and not (isinstance(choices, list) and all(
      isinstance(c, str) for c in choices)):
    raise BadRecord("bad_field_type", "'choices' must be a list of strings or null")
  answer_type = d.get("answer_type")
  task = d.get("task", d.get("data_source"))
  return dict(task=task if isinstance(task, str) else None,
              answer_type=answer_type if answer_type in schema.ANSWER_TYPES else None,
              choices=tuple(choices) if choices else None)


def read_chat(d: dict, *, record_id: str, base_dir: str, image_root: str = "") -> Trajectory:
  """A chat / LLaVA record (messages or conversations). The answer is the record's
  "answer", else the last \\boxed{} of the final reply, else the reply itself."""
  system = d.get("system") if isinstance(d.get("system"), str) else None
  system, history, question, reply, inline = _turns(
      d.get("messages", d.get("conversations")), system)
  answer = _gold(d["answer"]) if "answer" in d else (_boxed(reply) or reply).strip()
  if not answer:
    raise BadRecord("missing_field", "no answer and no final reply")
  return Trajectory(id=record_id, images=_images(d, inline, base_dir, image_root),
                    question=question, trajectory=reply, answer=answer, system=system,
                    history=history, **_optional(d))


def read_rl(d: dict, *, record_id: str, base_dir: str, image_root: str = "") -> Trajectory:
  """An RL prompt row; the trajectory is empty (or the row's "response")."""
  prompt = d.get("prompt", d.get("problem"))
  system, history, inline = d.get("system"), (), []
  if isinstance(prompt, list):
    system, history, prompt, _, inline = _turns(prompt, system)
  if not isinstance(prompt, str) or not prompt.strip():
    raise BadRecord("missing_field", "no prompt or problem")
  if "answer" in d:
    gold = d["answer"]
  elif "solution" in d:
    gold = d["solution"]
  elif isinstance(d.get("reward_model"), dict) and "ground_truth" in d["reward_model"]:
    gold = d["reward_model"]["ground_truth"]
  else:
    raise BadRecord("missing_field", "no answer, solution or reward_model.ground_truth")
  answer = _gold(gold)
  if not answer:
    raise BadRecord("missing_field", "the gold answer is empty")
  response = d.get("response")
  return Trajectory(id=record_id, images=_images(d, inline, base_dir, image_root),
                    question=prompt, trajectory=response if isinstance(response, str) else "",
                    answer=answer, system=system if isinstance(system, str) else None,
                    history=history, **_optional(d))


def read_atlas(d: dict, *, record_id: str, base_dir: str, image_root: str = "") -> Trajectory:
  del record_id
  return schema.from_dict(d, base_dir=base_dir, image_root=image_root)


READERS = {"atlas": read_atlas, "chat": read_chat, "llava": read_chat, "rl": read_rl}


def _raw_objects(path: str) -> Iterator[tuple[int, bytes | object]]:
  """(index, raw line bytes, an already-parsed JSON value, or a BadRecord) for each record
  of a file: the elements of a JSON list, a single JSON object that spans lines, or lines."""
  with open(path, "rb") as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  if head.startswith(b"["):
    yield from enumerate(_list_items(path))
    return
  if head.startswith(b"{") and _spans_lines(path):
    with open(path, "rb") as f:
      raw = f.read()
    try:
      obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
      obj = BadRecord("undecodable_bytes", f"byte {e.start}: {e.reason}")
    except (ValueError, RecursionError):
      obj = None
    if isinstance(obj, (dict, BadRecord)):
      yield 0, obj
      return
  with open(path, "rb") as f:
    for i, line in enumerate(f):
      if line.strip():
        yield i, line


def _spans_lines(path: str) -> bool:
  """Whether the first line of a file opens a JSON object that it does not close (a
  pretty-printed object, not JSON lines)."""
  with open(path, "rb") as f:
    first = f.readline().decode("utf-8-sig", errors="replace").strip()
  try:
    json.loads(first)
  except json.JSONDecodeError as e:
    return e.pos >= len(first)  # valid up to the end of the line, then cut off
  except (ValueError, RecursionError):
    return False
  return False


def _list_items(path: str) -> Iterator[object]:
  """The elements of a JSON list file; when it does not parse as a whole, one at a time
  (`_salvage_list`). Undecodable bytes make their element a BadRecord."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text, lossy = raw.decode("utf-8-sig"), False
  except UnicodeDecodeError:
    text, lossy = raw.decode("utf-8-sig", errors="surrogateescape"), True
  try:
    items = json.loads(text)
  except (ValueError, RecursionError):
    items = None
  if not isinstance(items, list):
    items = _salvage_list(text)
  for k, item in enumerate(items):
    if lossy and not isinstance(item, BadRecord) and _has_surrogates(item):
      item = BadRecord("undecodable_bytes", f"record {k}")
    yield item


def _salvage_list(text: str) -> Iterator[object]:
  """Elements of a JSON list that does not parse as a whole, one at a time; a broken
  element becomes a BadRecord and reading resumes at the next '{' starting a line."""
  decoder, i = json.JSONDecoder(), text.index("[") + 1
  while True:
    while i < len(text) and text[i] in " \t\r\n,":
      i += 1
    if i >= len(text) or text[i] == "]":
      return
    try:
      obj, i = decoder.raw_decode(text, i)
      yield obj
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
      yield BadRecord("malformed_json", f"{type(e).__name__}: {str(e):.200}")
      m = re.compile(r"\n\s*\{").search(text, i + 1)
      if not m:
        return
      i = m.end() - 1


def _has_surrogates(obj) -> bool:
  """Whether a parsed value holds undecodable bytes (as surrogate escapes)."""
  try:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return False
  except (UnicodeEncodeError, RecursionError, ValueError):
    return True


def check_data_file(path: str, what: str = "data file") -> None:
  """Raises FileNotFoundError naming `path` unless it is a regular file (a directory, a
  FIFO or a device is refused before it is opened)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} is not a regular file")


def iter_records(path: str, *, format: str = "auto", image_root: str = "",
                 allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS
                 ) -> Iterator[Trajectory | BadRecord]:
  """Each record of a .json or .jsonl file as a Trajectory (text checked, image paths
  resolved, images not yet opened), or the BadRecord saying why it cannot be used. Ids
  are the record's "id", else "<file stem>-<index>"; a repeated id is a BadRecord."""
  if format not in FORMATS:
    raise ValueError(f"data format {format!r} is not one of {FORMATS}")
  check_data_file(path, "trajectory file")
  base_dir = os.path.dirname(os.path.abspath(path))
  stem = os.path.splitext(os.path.basename(path))[0]
  seen, last = set(), None
  for index, raw in _raw_objects(path):
    try:
      rec, last = _record(raw, index, format if format != "auto" else None, last, stem,
                          base_dir, image_root, allowed_tokens)
      if rec.id in seen:
        raise BadRecord("duplicate_id", rec.id)
      seen.add(rec.id)
    except BadRecord as e:
      yield e
      continue
    except (ImportError, MemoryError):  # the environment, not the record
      raise
    except Exception as e:  # noqa: BLE001  (a record must never end a run)
      yield BadRecord("read_error", f"record {index}: {type(e).__name__}: {str(e):.200}")
      continue
    yield rec


def _record(raw, index, format, last, stem, base_dir, image_root, allowed_tokens
            ) -> tuple[Trajectory, str]:
  """One raw record (line bytes, a parsed value or a BadRecord) -> (a checked Trajectory,
  its format): `format` if given, else the one its fields show, else `last`. Raises
  BadRecord."""
  if isinstance(raw, BadRecord):
    raise raw
  if isinstance(raw, bytes):
    d = schema.load_json(schema.decode_line(raw))
  elif isinstance(raw, dict):
    d = raw
  else:
    raise BadRecord("malformed_json", f"expected an object, got {type(raw).__name__}")
  kind = format or detect(d) or last
  if kind is None:
    raise BadRecord("unknown_format", f"record {index} has fields {sorted(d)[:8]}")
  rid = d.get("id")
  rid = str(rid) if isinstance(rid, (str, int)) and str(rid).strip() else \
      f"{stem}-{index:06d}"
  rec = READERS[kind](d, record_id=rid, base_dir=base_dir, image_root=image_root)
  return schema.check_text(rec, allowed_tokens), kind


def read_jsonl(path: str, *, allowed_tokens: Iterable[str] = FUNCTIONAL_TOKENS,
               check_images: bool = True, format: str = "auto", image_root: str = ""):
  """Valid records of a data file (any `FORMATS`) and a Counter of skipped ones by reason
  (images opened and checked unless `check_images` is False). A missing file raises
  FileNotFoundError naming it; bad records never raise."""
  records, skipped = [], collections.Counter()
  for rec in iter_records(path, format=format, image_root=image_root,
                          allowed_tokens=allowed_tokens):
    try:
      if isinstance(rec, BadRecord):
        raise rec
      if check_images:
        schema.load_images(rec)
    except BadRecord as e:
      skipped[e.reason] += 1
      continue
    records.append(rec)
  return records, skipped


def convert(src: str, dst: str, *, format: str = "auto", image_root: str = "",
            check_images: bool = True, **limits) -> tuple[int, dict]:
  """Writes the usable records of `src` (any FORMATS) to `dst` as this project's JSONL;
  embedded images become files under <dst folder>/images/<dst stem>/. `limits` are
  `schema.load_images`' (min_pixels, max_pixels, max_images, max_patches). Returns
  (records written, {reason: skipped}); when no record is usable, raises
  `schema.NoUsableRecord` and writes nothing."""
  from PIL import Image
  out_dir = os.path.dirname(os.path.abspath(dst))
  image_dir = os.path.join(out_dir, "images", os.path.splitext(os.path.basename(dst))[0])
  skipped, written = collections.Counter(), []
  for rec in iter_records(src, format=format, image_root=image_root):
    try:
      if isinstance(rec, BadRecord):
        raise rec
      if check_images:
        schema.load_images(rec, **limits)
    except BadRecord as e:
      skipped[e.reason] += 1
      continue
    paths = []
    for k, ref in enumerate(rec.images):
      if isinstance(ref, bytes):
        try:
          with Image.open(io.BytesIO(ref)) as img:
            ext = {"JPEG": "jpg"}.get(img.format, (img.format or "bin").lower())
        except Exception:  # noqa: BLE001  (not checked: --check_images=false)
          ext = "bin"
        os.makedirs(image_dir, exist_ok=True)
        ref_path = os.path.join(image_dir, f"{len(written):06d}-{k}.{ext}")
        with open(ref_path, "wb") as f:
          f.write(ref)
        ref = ref_path
      paths.append(ref)
    written.append(dataclasses.replace(rec, images=tuple(paths)))
  if not written:
    raise schema.NoUsableRecord(src, skipped, image_root=image_root, root_name="--image_root")
  os.makedirs(out_dir, exist_ok=True)
  schema.write_jsonl(dst, written)
  return len(written), dict(skipped)

