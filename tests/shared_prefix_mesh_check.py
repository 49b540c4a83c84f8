"""The shared-prefix update on fake CPU meshes against the unshared one on one device (run
by tests/test_shared_prefix.py in a subprocess with 4 host devices): prints one JSON line,
{mesh: {"loss", "metrics", "grads", "micro_logps": largest absolute differences}}."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
os.environ["JAX_PLATFORMS"] = "cpu"

import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from atlas_jax import sharding  # noqa: E402
from atlas_jax.model import param_shardings  # noqa: E402
from atlas_jax.rl import rollout  # noqa: E402
from atlas_jax.rl import update as update_lib  # noqa: E402
from tests import test_shared_prefix as T  # noqa: E402

MESHES = {"data=2,tensor=2": dict(data=2, fsdp=1, tensor=2),
          "fsdp=4": dict(data=1, fsdp=4, tensor=1)}


def main():
  g, b = 4, 4
  prompts, comps, adv = T._groups(g, seed=5, b=b)
  flat = jax.tree.map(np.asarray, rollout.assemble(prompts, comps, jnp.asarray(adv),
                                                  group_size=g))
  grouped = jax.tree.map(np.asarray, rollout.assemble_grouped(prompts, comps,
                                                              jnp.asarray(adv)))
  flat, grouped = T._with_logps(flat, grouped)
  (want_loss, want_m), want_g = T._loss_and_grads(flat, T.BASE)
  loss_fn = functools.partial(update_lib.rl_loss, T.CONFIG, settings=T.BASE, temperature=1.0,
                              functional_ids=jnp.asarray(T.FUNCTIONAL), chunk=T.CHUNK)
  report = {}
  for name, shape in MESHES.items():
    mesh = sharding.make_mesh(shape)
    params = jax.device_put(T._params(), param_shardings(mesh, T.CONFIG))
    dev = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
           for k, v in grouped.items()}
    with sharding.with_rules(mesh, sharding.RULES):
      (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch=dev)
      micro = update_lib.micro_batches(
          {k: v for k, v in dev.items() if k not in ("old_logp", "ref_logp")}, 2 if
          shape["fsdp"] == 1 else 1, mesh)
      logps = [jax.jit(functools.partial(T.shared_prefix.token_logps, T.CONFIG,
                                         chunk=T.CHUNK))(params, mb)[0] for mb in micro]
    cat = np.concatenate([np.asarray(x) for x in logps])
    order = np.concatenate([np.asarray(mb["completion_ids"]) for mb in micro])
    single, _ = T._logps(grouped)
    rows = [int(np.flatnonzero((grouped["completion_ids"] == row).all(1))[0]) for row in order]
    report[name] = dict(
        loss=abs(float(loss) - float(want_loss)),
        metrics=max(abs(float(m[k]) - float(want_m[k])) for k in want_m),
        grads=max(float(jnp.max(jnp.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(grads), jax.tree.leaves(want_g))),
        micro_logps=float(np.abs(cat - np.asarray(single)[rows]).max()),
        micro_batches=len(micro))
  print(json.dumps(report))


if __name__ == "__main__":
  main()
