"""A small byte-level BPE tokenizer with Qwen's special tokens and chat template.

No model hub exists for tests and the demo, so this builds one with the `tokenizers`
library from a generated corpus and saves it as standard Hugging Face tokenizer files. A
real Qwen2.5-VL tokenizer directory goes through the same downstream code, which looks
tokens up by string and never assumes ids.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-VL-style chat template: string or list-of-parts content, image parts become
# <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_COLORS = ["red", "blue", "green", "yellow", "black", "orange", "purple", "gray"]
_SHAPES = ["circle", "square", "triangle", "star", "segment", "line", "arrow", "region",
           "object", "pattern", "option", "quadrant"]
_RELATIONS = ["left of", "right of", "above", "below", "inside", "next to"]
_VERBS = ["I will", "Let me", "Now I", "First I", "Then I", "Next I"]
_ACTIONS = ["draw an auxiliary line along", "outline the region around", "point at",
            "number the", "label each", "focus on", "flip", "rotate", "compare the lengths of",
            "count the", "mark the direction from", "crop the area near", "highlight"]


def default_corpus() -> list[str]:
  """Templated sentences about shapes, counts, relations and answers (deterministic)."""
  lines = []
  for verb, action, color, shape in itertools.product(_VERBS, _ACTIONS, _COLORS[:4],
                                                      _SHAPES[:6]):
    lines.append(f"{verb} {action} the {color} {shape}.")
  for color, shape, rel, other in itertools.product(_COLORS, _SHAPES, _RELATIONS, _SHAPES[:4]):
    lines.append(f"The {color} {shape} is {rel} the {other}.")
  for n in range(0, 41):
    lines.append(f"There are {n} objects. I count {n} of them: {', '.join(map(str, range(1, n % 9 + 2)))}.")
  for letter in "ABCDE":
    lines.append(f"Therefore the answer is \\boxed{{{letter}}}. Option ({letter}) is correct.")
    lines.append(f"Which option is correct? ({letter}) {letter}. Answer with the letter {letter}.")
  lines += ["Which segment is longest? Which region contains the star? How many circles are "
            "there? Is the square left of or right of the circle? Which option is the mirror "
            "image of the pattern after a 90 degree rotation?",
            "Put the final answer in \\boxed{}. Question: Options: Answer: Explain step by step.",
            "The quick brown fox jumps over the lazy dog 0123456789 + - * / = ( ) [ ] { } < > ?"]
  return lines


def build_tokenizer(out_dir: str, corpus: Iterable[str] | None = None, vocab_size: int = 1024):
  """Trains, saves (as HF files in `out_dir`) and returns a PreTrainedTokenizerFast."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>",
                                                                        "<|endoftext|>")],
      chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
