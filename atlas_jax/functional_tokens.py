"""The functional-token registry and the vocabulary-extension transform.

Functional tokens are ordinary vocabulary entries (added as *normal*, non-special tokens so
`decode(..., skip_special_tokens=True)` keeps them and rewards can see them), each standing
for a visual operation the model performs internally.

`extend_vocab` adds them to a Hugging Face tokenizer and makes the parameters agree: new ids
take spare embedding rows first (Qwen2.5-VL-7B has 152064 rows for 151665 tokens);
otherwise the embedding and the LM head grow to a multiple of 128. New rows start from the
mean of the existing rows (`mean`) or from the mean embedding of a short description of
the operation (`describe`). Calling it again changes nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from atlas_jax.model.config import ModelConfig

FUNCTIONAL_TOKENS = ("<|Manip|>", "<|Line|>", "<|Arrow|>", "<|Shape|>", "<|Text|>")

TOKEN_OPERATIONS = {
    "<|Manip|>": "manipulate the view: focus on, crop, flip or rotate part of the image",
    "<|Line|>": "draw an auxiliary line or highlight a segment in the image",
    "<|Arrow|>": "point at an object or mark a direction or relation between objects",
    "<|Shape|>": "outline or mark a region of the image",
    "<|Text|>": "label, annotate or number objects in the image",
}

# The token each family of the synthetic suite (`data.synthetic`) calls for: the reward's
# expected token for a sample of that task.
TASK_TOKENS = {"line_length": "<|Line|>", "count": "<|Text|>", "region": "<|Shape|>",
               "relation": "<|Arrow|>", "mirror": "<|Manip|>"}

PAD_MULTIPLE = 128
INIT_MODES = ("mean", "describe")


@dataclasses.dataclass(frozen=True)
class TokenTable:
  """token string -> id, in registry order. Saved with checkpoints; used by losses/rewards."""

  ids: dict[str, int]

  @property
  def tokens(self) -> tuple[str, ...]:
    return tuple(self.ids)

  @property
  def id_array(self) -> np.ndarray:
    return np.array(list(self.ids.values()), np.int32)

  def to_json(self) -> dict[str, int]:
    return dict(self.ids)

  @classmethod
  def from_json(cls, d: dict[str, int]) -> TokenTable:
    return cls({str(k): int(v) for k, v in d.items()})


def owned_ids_mask(tokenizer, vocab_size: int) -> np.ndarray:
  """bool[vocab_size]: True for ids that some token of the tokenizer owns.

  Rows past the tokenizer (padding of the embedding) are False; samplers never produce them.
  """
  owned = np.zeros(vocab_size, bool)
  ids = np.fromiter(tokenizer.get_vocab().values(), np.int64)
  owned[ids[ids < vocab_size]] = True
  return owned


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def token_id(tokenizer, token: str) -> int:
  tid = tokenizer.convert_tokens_to_ids(token)
  if tid is None or tid == tokenizer.unk_token_id:
    raise ValueError(f"the tokenizer has no {token} token; expected a Qwen2.5-VL tokenizer")
  return int(tid)


def fit_to_tokenizer(config: ModelConfig, tokenizer) -> ModelConfig:
  """A from-scratch config whose vocab and special ids come from the tokenizer."""
  vocab = _round_up(len(tokenizer), PAD_MULTIPLE)
  return dataclasses.replace(
      config.replace_text(vocab_size=vocab),
      image_token_id=token_id(tokenizer, "<|image_pad|>"),
      video_token_id=token_id(tokenizer, "<|video_pad|>"),
      vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
      vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
      eos_token_id=token_id(tokenizer, "<|im_end|>"),
      bos_token_id=token_id(tokenizer, "<|endoftext|>"),
      pad_token_id=token_id(tokenizer, "<|endoftext|>"))


def _new_rows(matrix, owned, mode: str, new_tokens, tokenizer):
  """Initial rows float32[len(new_tokens), D] for a [V, D] matrix (host or device array)."""
  matrix = jnp.asarray(matrix, jnp.float32)
  if mode == "mean":
    weights = jnp.asarray(owned, jnp.float32) / owned.sum()
    mean = jnp.einsum("V,VD->D", weights, matrix)
    return jnp.tile(mean[None], (len(new_tokens), 1))
  rows = []
  for token in new_tokens:
    text = TOKEN_OPERATIONS.get(token, token.strip("<|>"))
    ids = [i for i in tokenizer.encode(text, add_special_tokens=False)
           if i < len(owned) and owned[i]]
    if not ids:
      raise ValueError(f"description of {token} tokenizes to no existing id; cannot use "
                       "init='describe'")
    rows.append(jnp.mean(matrix[jnp.asarray(ids)], axis=0))
  return jnp.stack(rows)


def _grown(refit, matrix, axis: int):
  """refit(matrix, axis, gathered): the matrix with its vocab `axis` grown.

  A jax.Array with a NamedSharding grows born sharded: one jitted program whose output
  keeps the input's partition spec. Inside it, the new rows are computed from the matrix
  with its vocab axis replicated (each device reduces over every row of its own columns),
  so the rows are bitwise those a single device computes. Host arrays grow on the default
  device, as before.
  """
  sharding = getattr(matrix, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return refit(matrix, axis, lambda m: m)
  spec = list(tuple(sharding.spec) + (None,) * (2 - len(sharding.spec)))
  columns = list(spec)
  columns[axis] = None
  by_column = NamedSharding(sharding.mesh, PartitionSpec(*columns))
  gathered = lambda m: jax.lax.with_sharding_constraint(m, by_column)
  return jax.jit(lambda m: refit(m, axis, gathered),
                 out_shardings=NamedSharding(sharding.mesh, PartitionSpec(*spec)))(matrix)


def extend_vocab(tokenizer, params, config: ModelConfig, tokens=FUNCTIONAL_TOKENS,
                 init: str = "mean"):
  """Adds `tokens` to the tokenizer (in place) and fits params/config to it.

  Args:
    tokenizer: a transformers tokenizer loaded from a local directory; modified in place.
    params: model params (host or device arrays); not modified. Only the embedding and
      LM head change; sharded arrays grow born sharded (their partition spec kept, never
      gathered whole), with the same new rows as on one device, bitwise.
    config: the ModelConfig of `params`.
    tokens: token strings to register, in order.
    init: "mean" or "describe" for the rows of newly added tokens.
  Returns:
    (params, config, TokenTable). Idempotent: a second call returns the same ids and
    leaves params untouched.
  """
  from tokenizers import AddedToken

  if init not in INIT_MODES:
    raise ValueError(f"init {init!r} is not one of {INIT_MODES}")
  vocab = tokenizer.get_vocab()
  special = set(getattr(tokenizer, "all_special_tokens", []))
  clash = [t for t in tokens if t in special]
  if clash:
    raise ValueError(f"{clash[0]} is already a special token of the tokenizer; functional "
                     "tokens must be normal tokens so decoding keeps them")
  new_tokens = [t for t in tokens if t not in vocab]
  owned_before = owned_ids_mask(tokenizer, config.text.vocab_size)
  if new_tokens:
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False)
                          for t in new_tokens])
  vocab = tokenizer.get_vocab()
  table = TokenTable({t: int(vocab[t]) for t in tokens})
  for t in tokens:  # a normal token must encode to exactly its own id
    if tokenizer.encode(t, add_special_tokens=False) != [table.ids[t]]:
      raise ValueError(f"{t} does not encode to the single id {table.ids[t]}")
  if not new_tokens:
    return params, config, table

  rows = config.text.vocab_size
  needed = max(vocab.values()) + 1
  new_rows = _round_up(needed, PAD_MULTIPLE) if needed > rows else rows
  new_ids = np.array([table.ids[t] for t in new_tokens])

  def refit(matrix, axis: int, gathered):  # the vocab axis of [V, D] / [D, V] grows
    init_rows = _new_rows(gathered(matrix) if axis == 0 else gathered(matrix).T,
                          owned_before, init, new_tokens, tokenizer)  # [n, D]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, new_rows - rows)
    matrix = jnp.pad(jnp.asarray(matrix), pad)
    if axis == 0:
      return matrix.at[new_ids].set(init_rows.astype(matrix.dtype))
    return matrix.at[:, new_ids].set(init_rows.T.astype(matrix.dtype))

  params = dict(params)
  params["embed"] = {"embedding": _grown(refit, params["embed"]["embedding"], 0)}
  if "lm_head" in params:
    params["lm_head"] = {"kernel": _grown(refit, params["lm_head"]["kernel"], 1)}
  config = config.replace_text(vocab_size=new_rows)
  return params, config, table
