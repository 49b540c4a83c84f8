"""Running the processes of one multi-process job on this machine (jax.distributed CPU
processes: the memory audit, the multi-host tests)."""

import subprocess


def run_together(commands: list[list[str]], *, cwd: str, env: dict,
                 timeout: float) -> list[tuple[int, str, str]]:
  """Starts every command at once, waits for all and returns (returncode, stdout, stderr)
  of each, in order. No process outlives the call (a timeout kills them all)."""
  procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd in commands]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]
