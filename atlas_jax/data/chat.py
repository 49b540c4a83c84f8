"""Chat rendering: a question (+ images) and an assistant trajectory to token ids with a
loss mask over the assistant's tokens only.

The text comes from the tokenizer's chat template, so a real Qwen2.5-VL tokenizer renders
its own format; the prompt and the assistant part are tokenized separately so the mask is
exact, and each image's single `<|image_pad|>` is expanded to its feature count.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOXED_SUFFIX = "\nPut the final answer in \\boxed{}."
IMAGE_PAD = "<|image_pad|>"
END_OF_TURN = "<|im_end|>"


def prompt_text(tokenizer, question: str, num_images: int, *, system: str | None = None,
                prompt_suffix: str = "") -> str:
  """The templated conversation up to and including the assistant header."""
  content = [{"type": "image"} for _ in range(num_images)]
  content.append({"type": "text", "text": question + prompt_suffix})
  messages = ([{"role": "system", "content": system}] if system else [])
  messages.append({"role": "user", "content": content})
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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


def render(tokenizer, question: str, trajectory: str | None, num_image_tokens: Sequence[int],
           *, system: str | None = None, prompt_suffix: str = "") -> dict:
  """Token ids and loss mask of one sample.

  Returns input_ids int32[T] and loss_mask int32[T]: 1 on the assistant's tokens and its
  closing `<|im_end|>`, 0 elsewhere. `trajectory=None` renders the prompt only (ending with
  the assistant header), for rollouts.
  """
  pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
  prompt = expand_image_pads(
      _ids(tokenizer, prompt_text(tokenizer, question, len(num_image_tokens), system=system,
                                  prompt_suffix=prompt_suffix)), pad_id, num_image_tokens)
  if trajectory is None:
    ids, mask = prompt, [0] * len(prompt)
  else:
    answer = _ids(tokenizer, trajectory + END_OF_TURN)
    tail = _ids(tokenizer, "\n")
    ids = prompt + answer + tail
    mask = [0] * len(prompt) + [1] * len(answer) + [0] * len(tail)
  return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
