"""The vocabulary-extension transform: ids, rows, growth, idempotence, decoding, logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import functional_tokens as ft
from atlas_jax.data import tokenizer as tokenizer_lib
from atlas_jax.model import forward, from_size, init_params
from atlas_jax.functional_tokens import fit_to_tokenizer

TOKENS = ft.FUNCTIONAL_TOKENS


def _model(tok, tied: bool, spare: int):
  """A tiny model whose embedding has `spare` rows beyond the tokenizer."""
  config = fit_to_tokenizer(from_size("tiny"), tok)
  config = config.replace_text(vocab_size=len(tok) + spare, tie_word_embeddings=tied)
  return config, init_params(config, jax.random.key(0))


@pytest.fixture
def tok(tmp_path):
  return tokenizer_lib.build_tokenizer(str(tmp_path))


@pytest.mark.parametrize("tied", [True, False])
def test_spare_rows_are_used_first(tok, tied):
  base = len(tok)
  config, params = _model(tok, tied, spare=7)
  new_params, new_config, table = ft.extend_vocab(tok, params, config)
  assert list(table.ids.values()) == list(range(base, base + 5))
  assert new_config.text.vocab_size == base + 7  # no growth
  assert new_params["embed"]["embedding"].shape == params["embed"]["embedding"].shape
  if not tied:
    assert new_params["lm_head"]["kernel"].shape == params["lm_head"]["kernel"].shape


@pytest.mark.parametrize("tied", [True, False])
def test_growth_pads_to_a_multiple_of_128_and_keeps_old_logits(tok, tied):
  config, params = _model(tok, tied, spare=2)  # 5 tokens do not fit in 2 spare rows
  ids = jnp.asarray(np.random.default_rng(0).integers(0, len(tok) - 10, (2, 9)))
  fwd = jax.jit(forward, static_argnums=0)
  before = fwd(config, params, ids, jnp.ones_like(ids))
  new_params, new_config, table = ft.extend_vocab(tok, params, config)
  v = new_config.text.vocab_size
  assert v % 128 == 0 and v >= len(tok) and v > config.text.vocab_size
  assert new_params["embed"]["embedding"].shape[0] == v
  if not tied:
    assert new_params["lm_head"]["kernel"].shape == (config.text.hidden_size, v)
  after = fwd(new_config, new_params, ids, jnp.ones_like(ids))
  owned_before = len(tok) - 5  # the tokenizer now holds the five new tokens
  np.testing.assert_allclose(after[..., :owned_before], before[..., :owned_before], atol=1e-6)
  # Padding rows (owned by no token) are zero and masked out as samplable ids.
  owned = ft.owned_ids_mask(tok, v)
  assert owned[list(table.ids.values())].all() and not owned[len(tok):].any()


def test_mean_and_describe_initialisation(tok):
  config, params = _model(tok, False, spare=16)
  owned = ft.owned_ids_mask(tok, config.text.vocab_size)
  emb = np.asarray(params["embed"]["embedding"])
  p_mean, _, table = ft.extend_vocab(tok, params, config, init="mean")
  want = emb[owned].mean(0)
  for tid in table.ids.values():
    np.testing.assert_allclose(np.asarray(p_mean["embed"]["embedding"][tid]), want, atol=1e-6)

  tok2 = tokenizer_lib.build_tokenizer(tok.name_or_path + "_2")
  p_desc, _, table2 = ft.extend_vocab(tok2, params, config, init="describe")
  line_ids = tok2.encode(ft.TOKEN_OPERATIONS["<|Line|>"], add_special_tokens=False)
  np.testing.assert_allclose(np.asarray(p_desc["embed"]["embedding"][table2.ids["<|Line|>"]]),
                             emb[line_ids].mean(0), atol=1e-6)
  head = np.asarray(params["lm_head"]["kernel"])
  np.testing.assert_allclose(np.asarray(p_desc["lm_head"]["kernel"][:, table2.ids["<|Line|>"]]),
                             head[:, line_ids].mean(1), atol=1e-6)


def test_idempotent(tok):
  config, params = _model(tok, True, spare=2)
  p1, c1, t1 = ft.extend_vocab(tok, params, config)
  n = len(tok)
  p2, c2, t2 = ft.extend_vocab(tok, p1, c1)
  assert t1 == t2 and c1 == c2 and len(tok) == n
  assert p2 is p1


def test_decoding_keeps_functional_tokens(tok):
  config, params = _model(tok, True, spare=8)
  ft.extend_vocab(tok, params, config)
  text = "I will outline the door.\n<|Shape|>\nTwo people.\n<|Text|>\n\\boxed{B}"
  ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
  decoded = tok.decode(ids, skip_special_tokens=True)
  assert decoded == text
  assert all(t not in tok.all_special_tokens for t in TOKENS)


def test_bad_requests_are_rejected(tok):
  config, params = _model(tok, True, spare=8)
  with pytest.raises(ValueError, match="init 'zeros' is not one of"):
    ft.extend_vocab(tok, params, config, init="zeros")
  with pytest.raises(ValueError, match="<\\|im_end\\|> is already a special token"):
    ft.extend_vocab(tok, params, config, tokens=("<|im_end|>",))


def test_token_table_json_round_trip(tok):
  config, params = _model(tok, True, spare=8)
  _, _, table = ft.extend_vocab(tok, params, config)
  assert ft.TokenTable.from_json(table.to_json()) == table
  assert table.tokens == TOKENS
  np.testing.assert_array_equal(table.id_array, list(table.ids.values()))
