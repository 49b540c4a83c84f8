"""config.data.prompt_suffix: "auto" (the default) appends the boxed-answer instruction
only where the record asks for a box (a boxed answer, or no answer: an RL prompt), never to
a user's chat or LLaVA answer without one; any other string is appended as given; the
build report says what was applied."""

import json

import pytest
from PIL import Image

from atlas_jax import config as config_lib
from atlas_jax.data import chat, pipeline, tfds_builder
from atlas_jax.data import tokenizer as tokenizer_lib
from atlas_jax.run import setup

BOXED = chat.BOXED_SUFFIX


@pytest.mark.parametrize("setting, trajectory, expected", [
    ("auto", "I measure it.\n<|Line|>\n\\boxed{B}", BOXED),  # an ATLAS trajectory
    ("auto", None, BOXED),                                    # an RL prompt
    ("auto", "", BOXED),
    ("auto", "The cat is black.", ""),                        # a chat / LLaVA answer
    ("", "\\boxed{B}", ""),                                   # explicit: as given
    ("\nAnswer briefly.", "The cat is black.", "\nAnswer briefly."),
])
def test_suffix_for(setting, trajectory, expected):
  assert chat.suffix_for(setting, trajectory) == expected


def test_the_default_is_auto_and_a_non_string_is_refused():
  c = config_lib.base_config()
  assert c.data.prompt_suffix == chat.AUTO_SUFFIX
  with c.data.ignore_type():
    c.data.prompt_suffix = 3
  with pytest.raises(ValueError, match="config.data.prompt_suffix 3 must be a string"):
    config_lib.validate(c)


def _user_text(tok, batch, row):
  text = tok.decode(batch["input_ids"][row])
  return text[:text.index("<|im_start|>assistant")]


@pytest.mark.parametrize("setting", ["auto", ""])
def test_chat_answers_keep_their_prompt_and_boxed_ones_get_the_suffix(tmp_path, setting):
  Image.new("RGB", (56, 56), "red").save(tmp_path / "a.png")
  rows = [{"id": "plain", "images": ["a.png"], "messages": [
              {"role": "user", "content": "<image>What colour?"},
              {"role": "assistant", "content": "It is red."}]},
          {"id": "boxed", "images": ["a.png"], "messages": [
              {"role": "user", "content": "<image>Which option?"},
              {"role": "assistant", "content": "I look.\n\\boxed{A}"}]}]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  opts = tfds_builder.BuildOptions(min_pixels=3136, max_pixels=3136, max_patches=16)
  report = tfds_builder.build_dataset(splits={"train": str(tmp_path / "c.jsonl")},
                                      data_dir=str(tmp_path / "tfds"), options=opts)
  assert report["answers"] == {"train": {"unboxed": 1, "boxed": 1}}
  tok = tokenizer_lib.build_tokenizer(str(tmp_path / "tok"))
  batch = next(pipeline.sft_pipeline(
      tfds_builder.open_source(report, "train"), tokenizer=tok, seed=0, num_epochs=1,
      shuffle=False, min_pixels=3136, max_pixels=3136, max_length=128, length_buckets=(128,),
      max_images=1, max_patches=16, batch_size=2, prompt_suffix=setting))
  users = {batch["id"][r]: _user_text(tok, batch, r) for r in range(2)}
  assert "\\boxed{}" not in users["plain"]
  assert ("\\boxed{}" in users["boxed"]) == (setting == "auto")
  line = setup.prompt_suffix_report(setting, report)
  assert line == ("'auto': train: 1 of 2 records get the boxed suffix (1 boxed answers, 0 "
                  "prompts without one; 1 unboxed answers get none)" if setting == "auto"
                  else "'' appended to every record's last user turn")
