"""Softmax attention behind one function, by implementation (`model.attention_impl`).

Letters: B batch, T query length, S key/value length, N query heads, K kv heads, G query
heads per kv head (N = K*G), H head dim, Q = G*T (a kv head's queries, flattened).

* "xla": einsums, on any backend. Queries are grouped per kv head as [B, K, G*T, H] so both
  products are plain batched matmuls over (B, K) (no repeated kv heads, no 5-D dot).
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU; fp16/bf16).
* "splash": Pallas splash attention (TPU): causal and/or segment masks built inside the
  kernel from `Mask.segment_ids`, GQA as one multi-query kernel per kv head.

A config may say "auto" (`for_platform`): splash on TPU, the einsums elsewhere.

The mask is either a dense bool[B, T, S] (True = may attend) or a `Mask`, which carries
the dense form and, when the caller knows it, its structure (segment ids, causality) that
the kernels need. Decode (T = 1 against a cache) under "splash" attends on
`decode_kernel` (the cache read once, blocks past the written slots skipped, no float32
scores in HBM); elsewhere on the "xla" path. "splash" leaves the sampler's prefill (T < S,
dense mask only) to the einsums. Under a mesh each device runs the kernel
on its part in a `shard_map` (XLA does not partition a Mosaic kernel): rows over the batch
axes, kv heads over tensor (`_per_device`). The kernel is compiled for real where the
devices are TPUs, also a TPU slice's topology on any host (`launch.aot_report`); elsewhere
it runs in Pallas interpret mode (slow; for tests).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from atlas_jax import sharding

Array = jax.Array
NEG_INF = float(jnp.finfo(jnp.float32).min)
IMPLEMENTATIONS = ("xla", "cudnn", "splash")
CHOICES = IMPLEMENTATIONS + ("auto",)  # config.model.attention_impl


def for_platform(impl: str, platform: str) -> str:
  """config.model.attention_impl as run on `platform` (a jax device's platform name):
  "auto" is splash on TPU and the einsums elsewhere (cuDNN stays an explicit choice: it
  needs bf16 or fp16); any other value is kept as given."""
  if impl != "auto":
    return impl
  return "splash" if platform == "tpu" else "xla"


@flax.struct.dataclass
class Mask:
  """Who may attend to whom.

  dense: bool[B, T, S] (True = may attend), the definition. segment_ids: int32[B, S] or
  None; with it, query t (at key slot t; T == S) may attend key s iff their segment ids are
  equal and, if `causal`, s <= t. Kernels use the structure; rows whose dense mask is all
  False (padding) may then differ, which callers ignore.
  """

  dense: Array
  segment_ids: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)


def as_dense(mask) -> Array | None:
  return mask.dense if isinstance(mask, Mask) else mask


def _xla(q: Array, k: Array, v: Array, mask: Array | None, return_probs: bool = False):
  return grouped(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, return_probs)


def grouped(q: Array, k: Array, v: Array, mask: Array | None, return_probs: bool = False):
  """The "xla" path with keys and values head-major: q [B, T, N, H], k, v [B, K, S, H]
  (the KV cache's layout, read without a transpose), mask bool[B, T, S] or None.
  Returns [B, T, N, H]; with `return_probs`, also the softmax float32[B, N, T, S]
  (the attention weights, before the cast to v's dtype)."""
  b, t, n, h = q.shape
  kv, s = k.shape[1], k.shape[2]
  g = n // kv
  q = jnp.transpose(q.reshape(b, t, kv, g, h), (0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
  logits = jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  if mask is not None:
    logits = jnp.where(mask[:, None, None], logits.reshape(b, kv, g, t, s), NEG_INF)
    logits = logits.reshape(b, kv, g * t, s)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BKQS,BKSH->BKQH", probs.astype(v.dtype), v)
  out = jnp.transpose(out.reshape(b, kv, g, t, h), (0, 3, 1, 2, 4)).reshape(b, t, n, h)
  if return_probs:
    return out, probs.reshape(b, n, t, s)
  return out


def _cudnn(q, k, v, mask, implementation="cudnn"):
  dense = as_dense(mask)
  return jax.nn.dot_product_attention(
      q, k, v, mask=None if dense is None else dense[:, None], implementation=implementation)


def _splash_kernel(groups: int, t: int, s: int, causal: bool, interpret: bool,
                   block_q: int, block_kv: int):
  """The kernel for one shape, built afresh in each trace (once per compile): the kernel
  keeps its mask tables as arrays, so a kernel cached across traces would carry one
  trace's tracers into the next (UnexpectedTracerError under scanned layers)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  one = splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))
  sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                            block_q_dkv=block_q, block_kv_dkv=block_kv,
                            block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                            block_kv_dq=block_kv)
  return splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([one] * groups), block_sizes=sizes, interpret=interpret)


def _interpret() -> bool:
  """Whether a Pallas TPU kernel runs interpreted: unless the devices it is compiled for
  are TPUs (the active mesh's: a TPU slice's topology compiles the real kernel on any
  host, `launch.aot_report`; else the default backend's)."""
  mesh = sharding.active_mesh()
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return platform != "tpu"


def _per_device(rows, q, k, v, q_rows, kv_rows, *, causal: bool):
  """`rows(q, k, v, q_rows, kv_rows)` (a kernel over q [B, K, ..., Tq, H] (the decode's:
  [B, K, G, H]), k, v [B, K, Tk, H], and two per-row arrays [B, Tq] and [B, Tk] or [B]:
  segment ids; the decode's mask bias and its last slot) run on each device's part under
  the active mesh: a
  Mosaic kernel is not partitioned by XLA, so it runs in a `shard_map`. The rows go over
  the batch axes (data, fsdp) and the kv heads over tensor where they divide; a batch of
  one sequence (the vision tower's patches) that is not causal splits its queries over the
  batch axes instead (each device: its queries against all keys); else it is replicated."""
  mesh = sharding.active_mesh()
  if mesh is None or mesh.size == 1:
    return rows(q, k, v, q_rows, kv_rows)
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  batch = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None
  ways = math.prod(mesh.shape[a] for a in batch or ())
  tensor = mesh.shape["tensor"]
  heads = "tensor" if tensor > 1 and q.shape[1] % tensor == 0 else None
  if batch and q.shape[0] % ways == 0:
    specs = (P(batch, heads),) * 3 + (P(batch),) * 2
    out = P(batch, heads)
  elif batch and not causal and q.shape[3] % (ways * 128) == 0:
    specs = (P(None, heads, None, batch), P(None, heads), P(None, heads), P(None, batch), P())
    out = P(None, heads, None, batch)
  else:
    specs, out = (P(None, heads),) * 3 + (P(),) * 2, P(None, heads)
  return jax.shard_map(rows, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)(
      q, k, v, q_rows, kv_rows)


def splash_blocks(t: int) -> tuple[int, int]:
  """(padded length, block) of the splash kernel for length t: it tiles by 128, or by 512
  when the padded length allows."""
  tp = -(-t // 128) * 128
  return tp, 512 if tp % 512 == 0 else 128


def _splash(q, k, v, mask, *, interpret: bool | None = None):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  if not isinstance(mask, Mask) or mask.segment_ids is None:
    raise ValueError("attention_impl 'splash' needs a Mask with segment_ids (the "
                     "structured mask); got a dense mask only")
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  if t != s:
    raise ValueError(f"attention_impl 'splash' needs query length == key length; got T={t}, "
                     f"S={s}")
  g = n // kv
  interpret = _interpret() if interpret is None else interpret
  q = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, t, kv, g, h)
  q = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, H]
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
  seg = mask.segment_ids.astype(jnp.int32)

  def rows(q, k, v, q_seg, kv_seg):  # one device's part: the kernel over its rows
    tq, tk = q.shape[3], k.shape[2]
    # Pad to the kernel's tiling, the padding in a segment of its own, and drop it after.
    (tqp, block_q), (tkp, block_kv) = splash_blocks(tq), splash_blocks(tk)
    kernel = _splash_kernel(g, tqp, tkp, mask.causal, interpret, block_q, block_kv)
    low = jnp.iinfo(jnp.int32).min
    pad = lambda x, to, **kw: jnp.pad(
        x, [(0, 0)] * (x.ndim - 2) + [(0, to - x.shape[-2]), (0, 0)], **kw)
    q, k, v = pad(q, tqp), pad(k, tkp), pad(v, tkp)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tqp - tq)), constant_values=low)
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, tkp - tk)), constant_values=low)

    def one_row(qb, kb, vb, qs, ks):  # [K, G, Tq, H], [K, Tk, H], [K, Tk, H], [Tq], [Tk]
      ids = splash.SegmentIds(q=qs, kv=ks)
      return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qb, kb, vb)

    return jax.vmap(one_row)(q, k, v, q_seg, kv_seg)[:, :, :, :tq]

  out = _per_device(rows, q, k, v, seg, seg, causal=mask.causal)  # [B, K, G, T, H]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(v.dtype)


def decode_blocks(s: int) -> int:
  """The key block of `decode_kernel` over a cache of s slots."""
  return next((b for b in (512, 256, 128) if s % b == 0), s)


def decode_kernel(q: Array, k: Array, v: Array, keys: Array, last: Array, *,
                  interpret: bool | None = None) -> Array:
  """One query per row against a KV cache (the decode step), as a Pallas TPU kernel: each
  row's cache is read once, block by block, with the softmax kept in on-chip memory
  (online), and key blocks past `last` are neither read nor computed; the einsums instead
  write and re-read float32 scores around their softmax and read every slot.

  q [B, 1, N, H]; k, v [B, K, S, H] (the cache's layout); keys bool[B, S] (True: may
  attend); last: int32 scalar, the highest slot any row may attend to. Returns
  [B, 1, N, H]. Under a mesh each device runs it on its rows and kv heads (`_per_device`)."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  b, _, n, h = q.shape
  kv, s = k.shape[1], k.shape[2]
  g = n // kv
  gp = -(-g // 8) * 8  # a kv head's queries, padded to the sublane tiling
  interpret = _interpret() if interpret is None else interpret
  block = decode_blocks(s)
  blocks = s // block
  qg = jnp.pad((q * jnp.asarray(h**-0.5, q.dtype)).reshape(b, kv, g, h),
               ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  bias = jnp.where(keys, 0.0, NEG_INF).astype(jnp.float32)
  lasts = jnp.full((b,), last, jnp.int32)

  def rows(q, k, v, bias, lasts):  # one device's part
    r = q.shape[0]
    rb = 8 if r % 8 == 0 else r

    def kernel(last_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, m_ref, l_ref, acc_ref):
      j = pl.program_id(2)

      @pl.when(j == 0)
      def _():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

      @pl.when(j * block <= last_ref[0])
      def _():
        for i in range(rb):
          scores = jax.lax.dot_general(q_ref[i, 0], k_ref[i, 0], (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)  # [gp, block]
          scores = scores + bias_ref[i:i + 1, :]
          m_prev = m_ref[i]  # [gp, 128], the running max broadcast over lanes
          m_new = jnp.maximum(m_prev, jnp.max(scores, axis=-1, keepdims=True))
          alpha = jnp.exp(m_prev - m_new)
          p = jnp.exp(scores - m_new[:, :1])
          l_ref[i] = alpha * l_ref[i] + jnp.sum(p, axis=-1, keepdims=True)
          pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[i, 0],
                                   (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)  # [gp, H]
          acc_ref[i] = acc_ref[i] * alpha[:, :1] + pv
          m_ref[i] = m_new

      @pl.when(j == blocks - 1)
      def _():
        o_ref[:, 0] = (acc_ref[...] / l_ref[...][..., :1]).astype(o_ref.dtype)

    # Past `last` the block index stays put: Pallas fetches nothing new.
    upto = lambda j, last_ref: jnp.minimum(j, jax.lax.div(last_ref[0], jnp.int32(block)))
    spec = pl.BlockSpec((rb, 1, block, h), lambda i, hd, j, last: (i, hd, upto(j, last), 0))
    per_head = pl.BlockSpec((rb, 1, gp, h), lambda i, hd, j, last: (i, hd, 0, 0))
    grid = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(r // rb, q.shape[1], blocks),
        in_specs=[per_head, spec, spec,
                  pl.BlockSpec((rb, block), lambda i, hd, j, last: (i, upto(j, last)))],
        out_specs=per_head,
        scratch_shapes=[pltpu.VMEM((rb, gp, 128), jnp.float32),
                        pltpu.VMEM((rb, gp, 128), jnp.float32),
                        pltpu.VMEM((rb, gp, h), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret)(lasts[:1], q, k, v, bias)

  out = _per_device(rows, qg, k, v, bias, lasts, causal=True)  # [B, K, gp, H]
  return out[:, :, :g].reshape(b, 1, n, h)


def _structured(mask, t: int, s: int) -> bool:
  return isinstance(mask, Mask) and mask.segment_ids is not None and t == s


def _one_block(q, k, v, mask, impl: str, return_probs: bool = False):
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl {impl!r} is not one of {IMPLEMENTATIONS}")
  if impl == "splash" and not _structured(mask, q.shape[1], k.shape[1]):
    impl = "xla"  # against a cache (prefill, decode): the mask is dense only
  if impl == "xla" or q.shape[1] == 1 or return_probs:
    return _xla(q, k, v, as_dense(mask), return_probs)
  if impl == "cudnn":
    return _cudnn(q, k, v, mask)
  return _splash(q, k, v, mask)


def _map_chunks(body, xs, unroll: bool):
  """`jax.lax.map` over the query chunks, or (unroll) a Python loop emitting every chunk."""
  if not unroll:
    return jax.lax.map(body, xs)
  n = jax.tree.leaves(xs)[0].shape[0]
  outs = [body(jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(n)]
  return jax.tree.map(lambda *x: jnp.stack(x), *outs)


def attention(q: Array, k: Array, v: Array, mask, chunk: int = 0, impl: str = "xla", *,
              return_probs: bool = False, unroll: bool = False):
  """Softmax attention with grouped kv heads; logits and softmax in fp32.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool[B, T, S], a `Mask`, or None.
  Returns [B, T, N, H]. With "xla", a query row with nothing to attend to gets a uniform
  average (never NaN); callers ignore such rows (padding).

  return_probs (static): also return the attention weights float32[B, N, T, S]. The
  kernels do not expose them, so this always takes the "xla" path (the one computing the
  softmax explicitly, as in training on CPU or with attention_impl "xla").

  chunk > 0 and T a multiple of it larger than it ("xla" only): queries are processed
  `chunk` at a time (a `lax.map` of rematerialised blocks), so the fp32 logits held at once
  are [B, N, chunk, S] instead of [B, N, T, S], in the forward and the backward pass.
  Exact: each query row's softmax sees all of its keys. unroll (static): the chunks are
  emitted one by one instead of as a loop (for cost counts: XLA counts a loop body once).
  """
  t = q.shape[1]
  if return_probs:
    impl = "xla"
  if impl != "xla" or not chunk or t <= chunk or t % chunk:
    return _one_block(q, k, v, mask, impl, return_probs)
  dense = as_dense(mask)
  n = t // chunk
  blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)
  # qm[1] None: no mask
  body = jax.checkpoint(lambda qm: _xla(qm[0], k, v, qm[1], return_probs))
  out = _map_chunks(body, (blocks(q), None if dense is None else blocks(dense)), unroll)
  if not return_probs:
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)
  out, probs = out  # probs [n, B, N, chunk, S]
  probs = jnp.moveaxis(probs, 0, 2).reshape(probs.shape[1], probs.shape[2], t, -1)
  return jnp.moveaxis(out, 0, 1).reshape(q.shape), probs


def shared_prefix(q: Array, prefix_k: Array, prefix_v: Array, k: Array, v: Array,
                  prefix_keys: Array, mask: Array, chunk: int = 0, *, unroll: bool = False):
  """Attention of R = B*C completions, C per prompt, over their prompt's keys and values
  (shared, never repeated) and their own ("xla" einsums; logits and softmax in fp32).

  Letters here: B prompts, C completions per prompt, P prompt length, T completion query
  length, S completion key length (T == S), K kv heads, G query heads per kv head, H head
  dim.

  q: [R, T, N, H]; prefix_k, prefix_v: [B, P, K, H]; k, v: [R, S, K, H] (rows prompt-
  major: row r continues prompt r // C); prefix_keys: bool[B, P] (the prompt's real
  tokens); mask: bool[R, T, S] (the completion's own keys each query may see: causal and
  not padding). Returns [R, T, N, H]: one softmax over the P + S keys, so each row equals
  the unshared attention over [prompt; completion]; the gradient into the prompt's keys and
  values is the sum over its C completions. chunk > 0 dividing T (and smaller): queries
  `chunk` at a time, rematerialised, as in `attention`.
  """
  r, t, n, h = q.shape
  b, p, kv = prefix_k.shape[:3]
  c, g, s = r // b, n // kv, k.shape[1]
  if r != b * c:
    raise ValueError(f"{r} completion rows are not a multiple of the {b} prompts")
  kg = k.reshape(b, c, s, kv, h)
  vg = v.reshape(b, c, s, kv, h)

  def block(qm):  # q [B, C, t, K, G, H], own-key mask [B, C, t, S]
    qb, mb = qm
    logits_p = jnp.einsum("BCTKGH,BPKH->BCKGTP", qb, prefix_k,
                          preferred_element_type=jnp.float32) * (h**-0.5)
    logits_o = jnp.einsum("BCTKGH,BCSKH->BCKGTS", qb, kg,
                          preferred_element_type=jnp.float32) * (h**-0.5)
    logits_p = jnp.where(prefix_keys[:, None, None, None, None, :], logits_p, NEG_INF)
    logits_o = jnp.where(mb[:, :, None, None], logits_o, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([logits_p, logits_o], axis=-1), axis=-1)
    probs = probs.astype(v.dtype)
    return (jnp.einsum("BCKGTP,BPKH->BCTKGH", probs[..., :p], prefix_v)
            + jnp.einsum("BCKGTS,BCSKH->BCTKGH", probs[..., p:], vg))

  qg = q.reshape(b, c, t, kv, g, h)
  mg = mask.reshape(b, c, t, s)
  if not chunk or t <= chunk or t % chunk:
    return block((qg, mg)).reshape(r, t, n, h)
  m = t // chunk
  blocks = lambda x: jnp.moveaxis(x.reshape(b, c, m, chunk, *x.shape[3:]), 2, 0)
  out = _map_chunks(jax.checkpoint(block), (blocks(qg), blocks(mg)), unroll)  # [m, B, C, ..]
  return jnp.moveaxis(out, 0, 2).reshape(r, t, n, h)


def _splash_offset_kernel(groups: int, tq: int, tk: int, offset: int, interpret: bool,
                          block_q: int, block_kv: int):
  """A causal splash kernel whose queries start `offset` keys in (query i sees keys
  j <= i + offset), built afresh in each trace as `_splash_kernel`."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  one = splash.CausalMask((tq, tk), offset=offset)
  sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                            block_q_dkv=block_q, block_kv_dkv=block_kv,
                            block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                            block_kv_dq=block_kv)
  return splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([one] * groups), block_sizes=sizes, interpret=interpret)


def shared_prefix_kernel(q: Array, prefix_k: Array, prefix_v: Array, k: Array, v: Array,
                         prefix_keys: Array, mask: Mask, impl: str, *,
                         interpret: bool | None = None):
  """`shared_prefix` on a kernel ("splash" or "cudnn"): each completion's keys and values
  laid out as its unshared row holds them, [its prompt's ; its own] (the prompt's repeated
  per completion: [R, P, K, H] per layer, small next to the activations; the gradient
  sums back over the repeats), in one kernel call per row.

  Letters and shapes as `shared_prefix`; mask: the completions' `Mask` (segment_ids their
  attention mask int[R, T], causal). splash: a causal mask offset by P (query i sees the P
  prompt keys and own keys j <= i) and segment ids (the prompt's real keys and the real
  completion tokens share segment 1), q and kv padded to the kernel's tiling; cudnn: the
  dense mask [prompt keys ; own mask]."""
  r, t, n, h = q.shape
  b, p, kv = prefix_k.shape[:3]
  c, g = r // b, n // kv
  rep = lambda x: jnp.repeat(x, c, axis=0)
  keys = jnp.concatenate([rep(prefix_k), k], axis=1)  # [R, P + S, K, H]
  values = jnp.concatenate([rep(prefix_v), v], axis=1)
  if impl == "cudnn":
    dense = jnp.concatenate([jnp.broadcast_to(rep(prefix_keys)[:, None], (r, t, p)),
                             mask.dense], axis=2)
    return _cudnn(q, keys, values, dense)
  if impl != "splash":
    raise ValueError(f"shared_prefix_kernel takes 'splash' or 'cudnn', not {impl!r}")
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  interpret = _interpret() if interpret is None else interpret
  tq, block_q = splash_blocks(t)
  # Keys padded past P + tq: every padding query i then sees its own padding key P + i.
  tk, block_kv = splash_blocks(p + tq)
  kernel = _splash_offset_kernel(g, tq, tk, p, interpret, block_q, block_kv)
  low = jnp.iinfo(jnp.int32).min
  own = mask.segment_ids.astype(jnp.int32)
  q_seg = jnp.pad(own, ((0, 0), (0, tq - t)), constant_values=low)
  kv_seg = jnp.pad(jnp.concatenate([rep(prefix_keys.astype(jnp.int32)), own], axis=1),
                   ((0, 0), (0, tk - p - t)), constant_values=low)
  q = (q * jnp.asarray(h**-0.5, q.dtype)).reshape(r, t, kv, g, h)
  q = jnp.transpose(jnp.pad(q, [(0, 0), (0, tq - t)] + [(0, 0)] * 3), (0, 2, 3, 1, 4))
  pad_kv = lambda x: jnp.swapaxes(jnp.pad(x, [(0, 0), (0, tk - p - t), (0, 0), (0, 0)]), 1, 2)
  keys, values = pad_kv(keys), pad_kv(values)  # [R, K, tk, H]

  def one_row(qb, kb, vb, qs, ks):  # [K, G, tq, H], [K, tk, H], [K, tk, H], [tq], [tk]
    ids = splash.SegmentIds(q=qs, kv=ks)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qb, kb, vb)

  out = _per_device(jax.vmap(one_row), q, keys, values, q_seg, kv_seg, causal=True)
  out = out[:, :, :, :t]  # [R, K, G, T, H]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(r, t, n, h).astype(v.dtype)
