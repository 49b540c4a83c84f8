"""The tiny tokenizer (Qwen specials, chat template) and chat rendering with loss masks."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from atlas_jax.data import chat, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_round_trip_and_special_tokens(tok, tmp_path):
  text = "The red circle is left of 12 squares; naïve → ok \\boxed{B}"
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  for t in tokenizer_lib.SPECIAL_TOKENS:
    ids = tok.encode(t, add_special_tokens=False)
    assert len(ids) == 1 and t in tok.all_special_tokens
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  reloaded = AutoTokenizer.from_pretrained(tok.name_or_path, local_files_only=True)
  assert reloaded.encode(text) == tok.encode(text)


def test_build_is_deterministic(tok, tmp_path):
  again = tokenizer_lib.build_tokenizer(str(tmp_path / "again"))
  assert again.get_vocab() == tok.get_vocab()


def test_chat_template_renders_qwen_format(tok):
  text = chat.prompt_text(tok, "How many?", 1)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?"
                  "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("counts", [[], [6], [4, 9]])
def test_render_masks_assistant_tokens_and_expands_images(tok, counts):
  traj = "I will count the red circles.\n<|Text|>\nThere are 3. Therefore the answer is \\boxed{B}."
  out = chat.render(tok, "How many red circles?", traj, counts, prompt_suffix=chat.BOXED_SUFFIX)
  ids, mask = out["input_ids"], out["loss_mask"]
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
  pad = tok.convert_tokens_to_ids("<|image_pad|>")
  assert int((ids == pad).sum()) == sum(counts)
  assert tok.decode(ids[mask == 1]) == traj + "<|im_end|>"
  assert mask[-1] == 0 and mask[0] == 0
  # Rendering in pieces equals tokenizing the templated whole (images not expanded).
  whole = chat.prompt_text(tok, "How many red circles?", len(counts),
                           prompt_suffix=chat.BOXED_SUFFIX) + traj + "<|im_end|>\n"
  ref = chat.expand_image_pads(tok.encode(whole, add_special_tokens=False), pad, counts)
  np.testing.assert_array_equal(ids, ref)


def test_prompt_only_ends_with_assistant_header(tok):
  out = chat.render(tok, "Which?", None, [4])
  assert tok.decode(out["input_ids"]).endswith("<|im_start|>assistant\n")
  assert out["loss_mask"].sum() == 0


def test_added_normal_token_is_one_id_inside_the_mask(tmp_path):
  tok = tokenizer_lib.build_tokenizer(str(tmp_path))
  tok.add_tokens(["<|Shape|>"])
  sid = tok.convert_tokens_to_ids("<|Shape|>")
  out = chat.render(tok, "Where?", "Outline it.\n<|Shape|>\n\\boxed{A}", [])
  positions = np.flatnonzero(out["input_ids"] == sid)
  assert len(positions) == 1 and out["loss_mask"][positions[0]] == 1
  assert "<|Shape|>" in tok.decode(out["input_ids"], skip_special_tokens=True)


def test_mismatched_image_count_is_an_error(tok):
  with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
    chat.expand_image_pads([5, 7, 5], 5, [3])
