"""Chat rendering: a conversation (+ images) to token ids with a loss mask over the
assistant's tokens only, on every assistant turn.

The text comes from the tokenizer's chat template, so a real Qwen2.5-VL tokenizer renders
its own format. The template is rendered once per turn prefix and cut into pieces (the
template's own text, then each assistant reply with its `<|im_end|>`); the pieces are
tokenized separately so the mask is exact, and each image's single `<|image_pad|>` is
expanded to its feature count. `<image>` in user text marks where an image goes; without
any, all images open the first user turn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOXED_SUFFIX = "\nPut the final answer in \\boxed{}."
# config.data.prompt_suffix "auto": the boxed suffix where the record asks for a box.
AUTO_SUFFIX = "auto"


def answer_kind(trajectory: str | None) -> str:
  """"boxed" (the record's answer holds \\boxed{}), "unboxed" (an answer without one) or
  "none" (no answer: an RL or evaluation prompt)."""
  if not trajectory:
    return "none"
  return "boxed" if "\\boxed{" in trajectory else "unboxed"


def suffix_for(setting: str, trajectory: str | None) -> str:
  """The text appended to a record's last user turn: `setting` itself, or for "auto" the
  boxed suffix when the record's answer is boxed (the synthetic suite, ATLAS trajectories)
  or it has none (an RL prompt, which the reward scores by its last \\boxed{}), and nothing
  for a user's chat or LLaVA answer without a box."""
  if setting != AUTO_SUFFIX:
    return setting
  return "" if answer_kind(trajectory) == "unboxed" else BOXED_SUFFIX
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = "<image>"
END_OF_TURN = "<|im_end|>"


def _user_content(text: str) -> list[dict]:
  parts = []
  for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
    if k:
      parts.append({"type": "image"})
    if piece:
      parts.append({"type": "text", "text": piece})
  return parts


def messages(question: str, num_images: int, *, system: str | None = None,
             history: Sequence[tuple[str, str]] = (), prompt_suffix: str = "") -> list[dict]:
  """Chat messages up to the last user turn; history assistants included."""
  users = [u for u, _ in history] + [question + prompt_suffix]
  placed = sum(u.count(IMAGE_PLACEHOLDER) for u in users)
  if placed == 0:
    users[0] = IMAGE_PLACEHOLDER * num_images + users[0]
  elif placed != num_images:
    raise ValueError(f"conversation has {placed} {IMAGE_PLACEHOLDER} placeholders but "
                     f"{num_images} images")
  out = [{"role": "system", "content": system}] if system else []
  for k, user in enumerate(users):
    out.append({"role": "user", "content": _user_content(user)})
    if k < len(history):
      out.append({"role": "assistant", "content": history[k][1]})
  return out


def prompt_text(tokenizer, question: str, num_images: int, *, system: str | None = None,
                prompt_suffix: str = "", history: Sequence[tuple[str, str]] = ()) -> str:
  """The templated conversation up to and including the last assistant header."""
  return tokenizer.apply_chat_template(
      messages(question, num_images, system=system, history=history,
               prompt_suffix=prompt_suffix), tokenize=False, add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text, add_special_tokens=False)


def expand_image_pads(ids: list[int], pad_id: int, counts: Sequence[int]) -> list[int]:
  """Replaces the k-th `pad_id` with counts[k] copies; the number of pads must match."""
  found = ids.count(pad_id)
  if found != len(counts):
    raise ValueError(f"prompt has {found} image placeholders but {len(counts)} images")
  out: list[int] = []
  k = 0
  for i in ids:
    if i == pad_id:
      out += [pad_id] * int(counts[k])
      k += 1
    else:
      out.append(i)
  return out


def _pieces(tokenizer, question, trajectory, num_images, system, history, prompt_suffix):
  """[(text, in_loss)] whose concatenation is the templated conversation."""
  msgs = messages(question, num_images, system=system, history=history,
                  prompt_suffix=prompt_suffix)
  replies = [a for _, a in history] + ([] if trajectory is None else [trajectory])
  user_at = [i for i, m in enumerate(msgs) if m["role"] == "user"]
  pieces, done = [], ""
  for k, at in enumerate(user_at):
    prefix = tokenizer.apply_chat_template(msgs[:at + 1], tokenize=False,
                                           add_generation_prompt=True)
    if not prefix.startswith(done):
      raise ValueError("the tokenizer's chat template does not render turn prefixes "
                       "consistently, so per-turn loss masks cannot be cut")
    pieces.append((prefix[len(done):], False))
    done = prefix
    if k < len(replies):  # a prompt (trajectory None) has no loss, history included
      pieces.append((replies[k] + END_OF_TURN, trajectory is not None))
      done += replies[k] + END_OF_TURN
  if trajectory is not None:
    pieces.append(("\n", False))
  return pieces


def render(tokenizer, question: str, trajectory: str | None, num_image_tokens: Sequence[int],
           *, system: str | None = None, prompt_suffix: str = "",
           history: Sequence[tuple[str, str]] = ()) -> dict:
  """Token ids and loss mask of one sample.

  Returns input_ids int32[T] and loss_mask int32[T]: 1 on every assistant reply's tokens
  and its closing `<|im_end|>`, 0 elsewhere. `trajectory=None` renders the prompt only
  (history included, ending with the assistant header, mask all 0), for rollouts.
  """
  pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
  ids, mask = [], []
  for text, in_loss in _pieces(tokenizer, question, trajectory, len(num_image_tokens), system,
                               history, prompt_suffix):
    piece = _ids(tokenizer, text)
    ids += piece
    mask += [int(in_loss)] * len(piece)
  found = ids.count(pad_id)
  if found != len(num_image_tokens):
    raise ValueError(f"prompt has {found} image placeholders but {len(num_image_tokens)} "
                     "images")
  out_ids, out_mask = [], []
  k = 0
  for i, m in zip(ids, mask):
    n = int(num_image_tokens[k]) if i == pad_id else 1
    k += i == pad_id
    out_ids += [i] * n
    out_mask += [m] * n
  return {"input_ids": np.asarray(out_ids, np.int32), "loss_mask": np.asarray(out_mask, np.int32)}
