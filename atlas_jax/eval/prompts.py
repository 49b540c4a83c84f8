"""The user text of a benchmark row, in each format's convention or with ATLAS's \\boxed{}.

  native    the convention of the row's format:
              jsonl    the question + the run's prompt suffix (what training used;
                       default the \\boxed{} instruction)
              tsv      VLMEvalKit's multiple-choice prompt: an optional "Hint: ..." line,
                       "Question: ...", "Options:" with one "A. ..." line per option, then
                       "Please select the correct answer from the options above."
              parquet  the file's `prompt` column when it has one (BLINK's), else the
                       question, then "Select from the following choices." and "(A) ..."
                       lines
  boxed     the same, with ATLAS's "Put the final answer in \\boxed{}." as the instruction
  question  the question field alone + the \\boxed{} instruction (for files whose question
            already lists the options, as the synthetic suite's)

Images are not placed here: without `<image>` markers they open the user turn
(`data/chat.py`), as VLMEvalKit puts them before the text.
"""

from __future__ import annotations

from atlas_jax.config import PROMPTS
from atlas_jax.data import chat
from atlas_jax.data.chat import BOXED_SUFFIX
from atlas_jax.eval.benchmarks import Item

VLMEVALKIT_INSTRUCTION = "Please select the correct answer from the options above."
HF_CHOICES = "Select from the following choices."


def _vlmevalkit_body(item: Item) -> str:
  lines = [f"Hint: {item.hint}"] if item.hint else []
  lines.append(f"Question: {item.record.question}")
  if item.options:
    lines.append("Options:")
    lines += [f"{k}. {v}" for k, v in item.options]
  return "\n".join(lines)


def _hf_body(item: Item) -> str:
  if item.prompt:
    return item.prompt
  text = item.record.question
  if item.options:
    text += "\n" + HF_CHOICES + "".join(f"\n({k}) {v}" for k, v in item.options)
  return text


def build(item: Item, mode: str = "native", *, suffix: str = BOXED_SUFFIX) -> str:
  """The user text of `item`. `suffix` is the native suffix of JSONL rows (a run's
  config.data.prompt_suffix; "auto" resolves by the row's answer, `chat.suffix_for`)."""
  if mode not in PROMPTS:
    raise ValueError(f"prompt {mode!r} is not one of {PROMPTS}")
  if mode == "question":
    return item.record.question + BOXED_SUFFIX
  if item.kind == "tsv":
    body = _vlmevalkit_body(item)
    if mode == "native":
      return body + ("\n" + VLMEVALKIT_INSTRUCTION if item.options else "")
    return body + BOXED_SUFFIX
  if item.kind == "parquet":
    return _hf_body(item) + (BOXED_SUFFIX if mode == "boxed" else "")
  native = chat.suffix_for(suffix, item.record.trajectory)
  return item.record.question + (native if mode == "native" else BOXED_SUFFIX)
