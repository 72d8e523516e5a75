"""The package's wiring: imports go one way, the library leaves the process alone.

- no import cycle between star_jax modules, function-level imports included (an AST walk);
- the library never imports the top-level `configs` package;
- private JAX APIs (`jax._src`) are used in star_jax/core/jax_compat.py only;
- importing every module changes no process setting (environment variables such as XLA_FLAGS
  and TF_CPP_MIN_LOG_LEVEL, which only `star_jax.commands.host.configure_process` sets).
"""

from __future__ import annotations

from tests.limits import LAST_GUARD_S

import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "star_jax")


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[module.removesuffix(".__init__")] = path
  return found


def _is_main_block(node: ast.AST) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__"
                  for c in node.test.comparators))


def _imports(path: str, module: str, known: set[str]) -> set[str]:
  """star_jax modules imported anywhere in the file (top level or inside functions)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  # A module's `if __name__ == "__main__":` block runs only when it is the program (then it is
  # `__main__`, not this module): its imports are the command's, not the library's.
  as_program = {id(n) for block in ast.walk(tree) if _is_main_block(block)
                for n in ast.walk(block)}
  for node in ast.walk(tree):
    if id(node) in as_program:
      continue
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module:
        out.add(name)
  return out


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(p, m, set(modules)) for m, p in modules.items()}
  # A package's __init__ importing its own submodules is how packages work, not a cycle.
  for m in graph:
    graph[m] = {d for d in graph[m] if not (m.startswith(d + ".") and d in modules)}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> None:
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        cycle = stack[stack.index(dep):] + [dep]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep)
    stack.pop()
    state[node] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module)


def test_library_never_imports_configs_and_keeps_jax_internals_in_one_place():
  for module, path in _modules().items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      for name in names:
        assert name != "configs" and not name.startswith("configs."), (module, name)
        if name.startswith("jax._src"):
          assert module == "star_jax.core.jax_compat", (module, name)


_PROBE = """
import importlib, json, os, sys
# The third-party libraries set some variables of their own when imported: they come first.
import cv2, clu.metric_writers, flax, jax, optax, orbax.checkpoint, tensorflow
import tensorflow_datasets
before = dict(os.environ)
names = json.loads(sys.argv[1])
for name in names:
  importlib.import_module(name)
after = dict(os.environ)
print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after)
                  if before.get(k) != after.get(k)}))
"""


def test_importing_the_library_changes_no_process_setting():
  modules = sorted(m for m in _modules() if not m.endswith("__main__"))
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
  proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(modules)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=LAST_GUARD_S, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  changed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not changed, changed
