"""The package is a one-way stack (DESIGN.md §2): every import of an atlas_jax module points
down the stack or across its own level without a cycle, sits at the top of its module (no
import inside a function dodges a cycle), and the library never imports `configs` or
`launch`. Read from the source with `ast`, nothing imported.

`python -m tests.test_layering` prints the module graph, level by level.
"""

import ast
import collections
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top: a module may import modules of its own level or below.
LEVELS = (
    ("atlas_jax", "atlas_jax.sharding"),
    ("atlas_jax.model",),
    ("atlas_jax.functional_tokens", "atlas_jax.multihost"),
    ("atlas_jax.data", "atlas_jax.hf", "atlas_jax.random_checkpoint", "atlas_jax.checkpoint",
     "atlas_jax.answers", "atlas_jax.sampler"),
    ("atlas_jax.config",),
    ("atlas_jax.run",),
    ("atlas_jax.eval",),
    ("atlas_jax.sft", "atlas_jax.rl"),
    ("atlas_jax.demo", "atlas_jax.ablate", "atlas_jax.aot", "atlas_jax.convert"),
)


def level_of(module: str) -> int:
  """The level of the longest LEVELS prefix naming `module` or a package above it."""
  best, found = -1, None
  for i, names in enumerate(LEVELS):
    for name in names:
      if (module == name or module.startswith(name + ".")) and len(name) > best:
        best, found = len(name), i
  if found is None:
    raise AssertionError(f"{module} has no level in tests/test_layering.py LEVELS")
  return found


def modules() -> dict[str, str]:
  """{module name: path} of every module of the package."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "atlas_jax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports(path: str, module: str, known) -> list[tuple[str, int, bool]]:
  """(imported module, line, at module level) for every import of atlas_jax, configs or
  launch in the file; `from a import b` names module a.b where that is a module."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  top = {id(n) for n in tree.body}
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] in ("atlas_jax", "configs", "launch"):
        out.append((name, node.lineno, id(node) in top))
  return out


def graph() -> dict[str, set[str]]:
  known = modules()
  return {m: {name for name, _, _ in imports(p, m, known) if name in known and name != m}
          for m, p in known.items()}


def test_imports_point_down_the_stack_and_sit_at_module_level():
  known = modules()
  problems = []
  for module, path in sorted(known.items()):
    here = level_of(module)
    for name, line, at_top in imports(path, module, known):
      where = f"{os.path.relpath(path, ROOT)}:{line}"
      if name.split(".")[0] in ("configs", "launch"):
        problems.append(f"{where} imports {name}: the library never imports configs/launch")
      elif not at_top:
        problems.append(f"{where} imports {name} inside a function")
      elif level_of(name) > here:
        problems.append(f"{where} imports {name} (level {level_of(name)}) from level {here}")
  assert not problems, "\n".join(problems)


def test_the_module_graph_has_no_cycle():
  edges = graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(edges[m]):
      if state.get(n) == "open":
        cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"
  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
  """The rules above fail where they should: a model module importing the RL loop."""
  module = tmp_path / "atlas_jax" / "model" / "bad.py"
  module.parent.mkdir(parents=True)
  module.write_text("from atlas_jax.rl import loop\n\ndef f():\n  import atlas_jax.sft\n")
  found = imports(str(module), "atlas_jax.model.bad", {"atlas_jax.rl.loop"})
  assert found == [("atlas_jax.rl.loop", 1, True), ("atlas_jax.sft", 4, False)]
  assert level_of("atlas_jax.rl.loop") > level_of("atlas_jax.model.bad")


def main():
  edges = graph()
  by_level = collections.defaultdict(list)
  for m in edges:
    by_level[level_of(m)].append(m)
  for level in sorted(by_level, reverse=True):
    print(f"level {level}")
    for m in sorted(by_level[level]):
      print(f"  {m:<34} -> {', '.join(sorted(edges[m])) or '-'}")


if __name__ == "__main__":
  main()
