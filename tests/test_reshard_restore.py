"""A checkpoint written over one mesh restores, born sharded, into another (SFT on fsdp=8,
RL on fsdp=4 x tensor=2): `launch.convert hf_to_orbax` writes from an fsdp=8 load, and
the params-only restore RL and the export use reads each device's blocks of the new mesh."""

from tests.test_hf_load import run_8_devices, write_mesh_model

_SCRIPT = """
import jax, numpy as np
from transformers import AutoTokenizer
from atlas_jax import checkpoint, convert, functional_tokens as ft, hf, sharding
from atlas_jax.model import abstract_params, config as config_lib, param_shardings
src, dst = {src!r}, {dst!r}
convert.hf_to_orbax(src, dst, fsdp=8, tensor=1)
extra = checkpoint.read_extra(dst + "/checkpoints", None)
config = config_lib.from_dict(extra["model_config"])
mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
shardings = param_shardings(mesh, config)
abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_params(config), shardings)
params = checkpoint.restore_params_only(dst + "/checkpoints", None, abstract)
base_config, base = hf.load(src)
base, _, _ = ft.extend_vocab(AutoTokenizer.from_pretrained(src, local_files_only=True), base,
                             base_config)
flat = jax.tree_util.tree_flatten_with_path
for (name, want), got, s in zip(flat(base)[0], jax.tree.leaves(params), jax.tree.leaves(shardings)):
  assert got.sharding == s, (name, got.sharding)
  assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), name
  for shard in got.addressable_shards:
    assert np.array_equal(np.asarray(shard.data), np.asarray(want)[shard.index]), name
print("restored sharded")
"""


def test_checkpoint_from_fsdp8_restores_sharded_on_fsdp4_tensor2(tmp_path):
  src = write_mesh_model(str(tmp_path / "hf"))
  out = run_8_devices(_SCRIPT.format(src=src, dst=str(tmp_path / "orbax")))
  assert "restored sharded" in out
