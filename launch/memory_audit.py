"""How much host memory each process of a multi-process run holds while it imports a Hugging
Face model and takes its first steps, against what it must hold.

  python -m launch.memory_audit                          # 0.52B, 2 processes x 4 devices
  python -m launch.memory_audit --size=small --processes=2 --devices=4 --tensor=2
  python -m launch.memory_audit --size=3b --file_dtype=bfloat16 --nosteps  # the import only

A random Qwen2.5-VL of the chosen shape is written in HF layout (`atlas_jax.random_checkpoint`,
with the tiny tokenizer; cached under --model_dir), then N jax.distributed CPU processes of D
devices each (mesh fsdp x tensor over all N*D; the settings every recipe takes at a
published size, `config.at_published_size`: bfloat16 compute, full remat, float32 Adam
moments) run, as `launch.train` and `launch.evaluate` do, `run.setup.load_model` on it, an
HF export of what it loaded, one evaluation batch (the sampler's prefill and decode) and
one compiled SFT step
(`sft.update.sft_step_fn` on the state `setup.create_state` builds). Phases, in order:

  read                    `hf.load` (the safetensors reads and, where it places them, the
                          placement of what it read)
  placement               `setup.load_model` before the extension (config, shardings)
  vocabulary extension    `functional_tokens.extend_vocab` (the five functional tokens) and
                          the rest of `setup.load_model` (its device_put to the shardings)
  export                  `hf.save` of the params as loaded (bfloat16 files, --shard_size):
                          one tensor gathered at a time; process 0 also holds the file
                          shard it fills
  first evaluation batch  the sampler's compile and one greedy batch
  first SFT step          the optimizer state, the step's compile and one step

`hf.load` and `functional_tokens.extend_vocab` are timed by wrapping the module functions
`setup.load_model` calls; nothing else is replaced. Each phase's peak is the process's
resident-memory high-water mark (VmHWM, reset through /proc/self/clear_refs at every phase
change, after freed memory the allocator kept is returned: a phase is not charged for the
previous one's garbage). The same run on the tiny model (the tiny widths at the audited shape's layer
counts: the same graphs to compile, so compilation's own memory cancels) is subtracted,
so the figure is what the model's size costs; it is given as a multiple of the model's float32 bytes, next to the phase's
floor: the process's share (1/N) of what the phase must hold, the params for read,
placement, extension, evaluation and export, params + gradients + both Adam moments
(float32) for the SFT step. What an export may hold beyond that is given beside the table:
the largest whole tensor and its bfloat16 copy, and on process 0 the shard it fills.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile

from absl import flags

from launch import cli
from launch import processes as processes_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "0.5b", ["tiny", "test", "small", "0.5b", "3b"],
                  "Model shape (SHAPES).")
flags.DEFINE_enum("file_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the safetensors files (params load as float32).")
flags.DEFINE_integer("processes", 2, "jax.distributed processes.")
flags.DEFINE_integer("devices", 4, "CPU devices per process.")
flags.DEFINE_integer("tensor", 2, "Mesh tensor axis (fsdp takes the rest).")
flags.DEFINE_string("model_dir", "", "Where the random HF directories are kept (default: a "
                    "temporary directory).")
flags.DEFINE_bool("steps", True, "Also take the first evaluation batch and SFT step (False: "
                  "the import's phases only).")
flags.DEFINE_string("shard_size", "100MB", "The export's safetensors shard size (hf.save's "
                    "max_shard_size).")
flags.DEFINE_string("json_out", "", "Also write the figures here as JSON.")
flags.DEFINE_integer("timeout", 1800, "Seconds each multi-process run may take.")
flags.DEFINE_string("worker", "", "(internal) run one process: JSON arguments.")

MIB = 2**20

# (text, vision) in random_checkpoint.hf_config's terms; the vocab is given, owned by the
# tiny tokenizer for its first ~1k rows (the rest are spare rows, as Qwen2.5-VL's are), or
# "tokenizer": just the tokenizer's rows, so the functional tokens grow the vocabulary.
SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size="tokenizer"),
             dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)),
    # 0.18B in 20 layers (a layer is 5% of the params: the decode holds one gathered, as
    # a real model's 28-80 layers make it 1-4%); each vocabulary matrix ~3.5%.
    "test": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=20,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=8192),
             dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4)),
    # The "before" figures of the README were measured at this one (vocabulary ~17% each).
    "small": (dict(hidden_size=896, intermediate_size=2432, num_hidden_layers=12,
                   num_attention_heads=14, num_key_value_heads=2, vocab_size=32768),
              dict(depth=4, hidden_size=512, intermediate_size=1408, num_heads=8)),
    # The default: 0.52B, untied (like 7B), each vocabulary matrix ~6% of the params.
    "0.5b": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=2, vocab_size=32768),
             dict(depth=8, hidden_size=512, intermediate_size=1408, num_heads=8)),
    # Qwen2.5-VL-3B's shape (tied embeddings).
    "3b": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                tie_word_embeddings=True),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16)),
}

PHASES = ("read", "placement", "vocabulary extension", "export", "first evaluation batch",
          "first SFT step")
# What a phase must hold, in params' float32 bytes, over all processes together.
FLOOR_UNITS = {"read": 1.0, "placement": 1.0, "vocabulary extension": 1.0,
               "first evaluation batch": 1.0, "first SFT step": 4.0, "export": 1.0}


def write_model(path: str, size: str, file_dtype: str = "float32",
                depth_of: str | None = None) -> int:
  """A random HF directory of shape `size` with the tiny tokenizer at `path` (kept if it
  is already there); depth_of: another shape whose text and vision layer counts it takes.
  Returns the parameter count."""
  text, vision = (dict(x) for x in SHAPES[size])
  if depth_of is not None:
    text["num_hidden_layers"] = SHAPES[depth_of][0]["num_hidden_layers"]
    vision["depth"] = SHAPES[depth_of][1]["depth"]
  done = os.path.join(path, "audit.json")
  if os.path.isfile(done):
    with open(done) as f:
      kept = json.load(f)
    if kept.get("shape") == [text, vision] and kept.get("file_dtype") == file_dtype:
      return kept["parameters"]
    shutil.rmtree(path)  # another shape's files
  from atlas_jax import random_checkpoint
  from atlas_jax.data.tokenizer import build_tokenizer
  tok = build_tokenizer(path)
  shape = [dict(text), dict(vision)]
  if text["vocab_size"] == "tokenizer":
    text["vocab_size"] = len(tok) + len(tok) % 2
  cfg = random_checkpoint.hf_config(text, vision, **{
      k: tok.convert_tokens_to_ids(t) for k, t in [
          ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
          ("vision_start_token_id", "<|vision_start|>"),
          ("vision_end_token_id", "<|vision_end|>"), ("bos_token_id", "<|endoftext|>"),
          ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")]})
  model = random_checkpoint.write(path, cfg, seed=0, norm_noise=0.0, dtype=file_dtype)
  count = sum(p.numel() for p in model.parameters())
  del model
  with open(done, "w") as f:
    json.dump({"parameters": count, "size": size, "file_dtype": file_dtype, "shape": shape}, f)
  return count


# ---------------------------------------------------------------------------------------
# One process


def _high_water() -> int:
  with open("/proc/self/status") as f:
    return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_high_water() -> None:
  """Starts a phase from what is live: freed memory the allocator kept goes back to the
  system first (glibc's malloc_trim), then the high-water mark restarts from there."""
  import ctypes
  import gc
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: the retained memory stays counted
    pass
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


class Peaks:
  """Per-phase peaks of resident memory: `enter(phase)` closes the current phase (its peak
  is the high-water mark since it began) and starts the next."""

  def __init__(self):
    self.phase, self.peaks = None, {}

  def enter(self, phase: str | None) -> None:
    if self.phase is not None:
      self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), _high_water())
    _reset_high_water()
    self.phase = phase


def _batch(tokenizer, config, rows: int, length: int):
  """One SFT batch and one evaluation batch of `rows` identical examples (one image)."""
  import numpy as np
  from PIL import Image

  from atlas_jax.data import chat, image as image_lib
  from atlas_jax.model import get_rope_index
  px, grid = image_lib.preprocess([Image.new("RGB", (56, 56), "white")])
  n = image_lib.num_image_tokens(grid).tolist()
  out = chat.render(tokenizer, "Which region?", "I outline it.\n<|Shape|>\n\\boxed{A}.", n)
  ids = np.full((1, length), tokenizer.pad_token_id, np.int32)
  mask, loss = np.zeros_like(ids), np.zeros_like(ids)
  t = len(out["input_ids"])
  ids[0, :t], mask[0, :t], loss[0, :t] = out["input_ids"], 1, out["loss_mask"]
  pos, _ = get_rope_index(ids, mask, grid, image_token_id=config.image_token_id,
                          spatial_merge_size=2)
  tile = lambda x: np.repeat(np.asarray(x), rows, 0)
  sft = dict(input_ids=tile(ids), attention_mask=tile(mask), loss_mask=tile(loss),
             position_ids=tile(np.asarray(pos).transpose(1, 0, 2)), pixel_values=tile(px[None]),
             image_grid_thw=tile(grid[None]), valid=np.ones(rows, np.int32))
  prompt = chat.render(tokenizer, "Which region?", None, n)["input_ids"]
  p = np.full((1, 64), tokenizer.pad_token_id, np.int32)
  pm = np.zeros_like(p)
  p[0, -len(prompt):], pm[0, -len(prompt):] = prompt, 1  # left-padded, as the evaluator
  evaluation = dict(input_ids=tile(p), attention_mask=tile(pm), pixel_values=tile(px[None]),
                    image_grid_thw=tile(grid[None]))
  return sft, evaluation


def worker(args: dict) -> dict:
  """One process of the audit: phases as in the module docstring. Returns its peaks."""
  import types

  import jax
  import jax.numpy as jnp

  from atlas_jax import functional_tokens, hf, multihost, sharding
  from atlas_jax import sampler as sampler_lib
  from atlas_jax.config import at_published_size, base_config
  from atlas_jax.run import optimizer as optimizer_lib
  from atlas_jax.run import setup
  from atlas_jax.sft.update import sft_step_fn

  c = base_config()
  at_published_size(c, tensor=args["tensor"], moments_dtype="float32")
  c.model.hf_path = args["path"]
  c.mesh.fsdp = -1
  c.distributed.initialize = True
  c.distributed.coordinator_address = args["coordinator"]
  c.distributed.num_processes = args["processes"]
  c.distributed.process_id = args["process_id"]
  c.train.logprob_chunk = 64
  setup.maybe_initialize_distributed(c)
  c.data.batch_size = jax.device_count() // args["tensor"]
  mesh = setup.make_mesh(c)
  tokenizer = setup.load_tokenizer(c, "")
  peaks = Peaks()

  def phase(name, fn, after):
    def wrapped(*a, **k):
      peaks.enter(name)
      out = jax.block_until_ready(fn(*a, **k))
      peaks.enter(after)
      return out
    return wrapped

  # What load_model does after the extension (its final device_put to the grown
  # vocabulary's shardings) counts with the extension.
  load, extend = hf.load, functional_tokens.extend_vocab
  hf.load = phase("read", load, "placement")
  functional_tokens.extend_vocab = phase("vocabulary extension", extend, "vocabulary extension")
  try:
    peaks.enter("placement")
    config, params, table = setup.load_model(c, tokenizer, mesh)
    jax.block_until_ready(params)
  finally:
    hf.load, functional_tokens.extend_vocab = load, extend

  if not args["steps"]:
    peaks.enter(None)
    return {"process": jax.process_index(), "peaks": peaks.peaks}
  # The export next (before the steps, whose freed memory the allocator may keep resident),
  # of the params as loaded: what `launch.convert --direction=orbax_to_hf` does.
  peaks.enter("export")
  with tempfile.TemporaryDirectory() as scratch:
    hf.save(config, params, tokenizer, args.get("export_dir") or scratch,
            max_shard_size=args["shard_size"])
  largest = hf.largest_tensor(config)

  peaks.enter("first evaluation batch")
  rows = c.data.batch_size // jax.process_count()
  sft_batch, eval_batch = _batch(tokenizer, config, rows, 128)
  sampler = sampler_lib.make_sampler(
      config, tokenizer, sampler_lib.SamplerSettings(max_new_tokens=8, greedy=True))
  with sharding.with_rules(mesh, sharding.RULES):
    out = sampler.sample(params, multihost.host_batch_to_device(eval_batch, mesh),
                         jax.random.key(0))
    jax.block_until_ready(out)
  del out, sampler

  peaks.enter("first SFT step")
  optimizer = optimizer_lib.make_optimizer(setup.resolve_optim(c))
  run = types.SimpleNamespace(mesh=mesh, model_config=config, config=c)
  state, state_sh = setup.create_state(run, params, optimizer)
  del params
  step = sft_step_fn(c, config, mesh, optimizer, state_sh, jnp.asarray(table.id_array))
  with sharding.with_rules(mesh, sharding.RULES):
    state, metrics = step(state, multihost.host_batch_to_device(sft_batch, mesh))
    loss = float(metrics["loss"])
  peaks.enter(None)
  count = sum(x.size for x in jax.tree.leaves(state.params))
  return {"process": jax.process_index(), "peaks": peaks.peaks, "loss": loss,
          "parameters_after_extension": int(count), "largest_tensor": largest}


# ---------------------------------------------------------------------------------------
# The audit


@dataclasses.dataclass
class Result:
  """Per-process peaks of one model and of the tiny model, and the table's figures."""

  size: str
  parameters: int
  processes: int
  devices: int
  tensor: int
  file_dtype: str
  peaks: list[dict]       # per process: phase -> bytes
  tiny_peaks: list[dict]
  largest_tensor: int = 0  # elements of the largest whole tensor an export gathers
  shard_bytes: int = 0     # the export's max_shard_size

  def export_in_flight(self, process: int) -> int:
    """Bytes an export may hold beyond the params' share: the largest tensor gathered in
    float32 and its bfloat16 copy, and on process 0 the file shard it fills."""
    return 6 * self.largest_tensor + (self.shard_bytes if process == 0 else 0)

  @property
  def phases(self) -> tuple[str, ...]:
    return tuple(p for p in PHASES if p in self.peaks[0])

  @property
  def model_bytes(self) -> int:
    return 4 * self.parameters

  def floor(self, phase: str) -> float:
    """The phase's floor as a multiple of the model's float32 bytes."""
    return FLOOR_UNITS[phase] / self.processes

  def excess(self, process: int, phase: str) -> int:
    return self.peaks[process][phase] - self.tiny_peaks[process][phase]

  def fraction(self, process: int, phase: str) -> float:
    return self.excess(process, phase) / self.model_bytes

  def table(self) -> str:
    head = (f"{self.size}: {self.parameters / 1e6:.0f}M parameters ({self.model_bytes / 2**30:.2f} "
            f"GiB float32, files {self.file_dtype}), {self.processes} processes x "
            f"{self.devices} devices, mesh fsdp={self.processes * self.devices // self.tensor}"
            f" x tensor={self.tensor}\npeak host memory per process above the tiny model's "
            "run, in model float32 bytes (GiB)")
    cols = [f"process {p}" for p in range(self.processes)]
    lines = [head, f"{'phase':<24}{'floor':>8}" + "".join(f"{c:>20}" for c in cols)]
    for phase in self.phases:
      cells = "".join(f"{self.fraction(p, phase):>11.2f} ({self.excess(p, phase) / 2**30:5.2f})"
                      for p in range(self.processes))
      lines.append(f"{phase:<24}{self.floor(phase):>8.2f}{cells}")
    if "export" in self.phases:
      lines.append(f"export in flight beyond the floor: {6 * self.largest_tensor / 2**30:.2f} "
                   "GiB (the largest tensor, float32 and bfloat16), and on process 0 the "
                   f"file shard it fills, up to {self.shard_bytes / 2**30:.2f} GiB")
    return "\n".join(lines)

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), model_bytes=self.model_bytes,
                fractions={ph: [self.fraction(p, ph) for p in range(self.processes)]
                           for ph in self.phases},
                floors={ph: self.floor(ph) for ph in self.phases})


def run_processes(path: str, processes: int, devices: int, tensor: int,
                  timeout: float, env: dict | None = None, steps: bool = True,
                  shard_size: str = "100MB", export_dir: str = "") -> list[dict]:
  """The worker in `processes` jax.distributed CPU processes of `devices` devices each."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # both runs compile: same work, no cache hits
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f) + \
      f" --xla_force_host_platform_device_count={devices}"
  commands = [[sys.executable, "-m", "launch.memory_audit", "--worker=" + json.dumps(dict(
      path=path, tensor=tensor, processes=processes, process_id=i,
      coordinator=f"localhost:{port}", steps=steps, shard_size=shard_size,
      export_dir=export_dir))]
      for i in range(processes)]
  results = []
  for i, (code, out, err) in enumerate(processes_lib.run_together(
      commands, cwd=root, env=env, timeout=timeout)):
    if code != 0:
      raise RuntimeError(f"audit process {i} exited {code}: {err[-3000:]}")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return sorted(results, key=lambda r: r["process"])


def audit(size: str, *, processes: int = 2, devices: int = 4, tensor: int = 2,
          file_dtype: str = "float32", model_dir: str = "", timeout: float = 1800,
          env: dict | None = None, steps: bool = True, shard_size: str = "100MB",
          export_dir: str = "") -> Result:
  """The audit of one shape (the tiny model's run first: the tiny widths at `size`'s layer
  counts, so that both compile the same graphs). export_dir: where the audited model's
  export is kept (default: a temporary directory, removed). Returns a Result."""
  model_dir = model_dir or tempfile.mkdtemp(prefix="memory_audit_")
  tiny = os.path.join(model_dir, f"tiny_as_{size}_{file_dtype}")
  big = os.path.join(model_dir, f"{size}_{file_dtype}")
  write_model(tiny, "tiny", file_dtype, depth_of=size)
  parameters = write_model(big, size, file_dtype)
  tiny_runs = run_processes(tiny, processes, devices, tensor, timeout, env, steps, shard_size)
  runs = run_processes(big, processes, devices, tensor, timeout, env, steps, shard_size,
                       export_dir)
  from atlas_jax.hf import parse_size
  return Result(size, parameters, processes, devices, tensor, file_dtype,
                [r["peaks"] for r in runs], [r["peaks"] for r in tiny_runs],
                largest_tensor=runs[0].get("largest_tensor", 0),
                shard_bytes=parse_size(shard_size) if steps else 0)


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(worker(json.loads(FLAGS.worker))), flush=True)
    return
  result = audit(FLAGS.size, processes=FLAGS.processes, devices=FLAGS.devices,
                 tensor=FLAGS.tensor, file_dtype=FLAGS.file_dtype, model_dir=FLAGS.model_dir,
                 timeout=FLAGS.timeout, steps=FLAGS.steps, shard_size=FLAGS.shard_size)
  print(result.table())
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(result.to_json(), f, indent=2)


if __name__ == "__main__":
  cli.run(main)
