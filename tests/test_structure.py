"""The package's wiring: imports go one way, the library leaves the process alone.

- no import cycle between star_jax modules, function-level imports included (an AST walk);
- the library never imports the top-level `configs` package;
- private JAX APIs (`jax._src`) are used in star_jax/core/jax_compat.py only;
- importing every module changes no process setting (environment variables such as XLA_FLAGS
  and TF_CPP_MIN_LOG_LEVEL, which only `star_jax.commands.host.configure_process` sets);
- argparse is the only argument parser (no absl flags, absl.app or ml_collections'
  config_flags anywhere), used in star_jax/commands only: train.py and eval.py just call their
  command there.
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


# The thin modules that keep the documented command names (`python -m star_jax.predict`...).
COMMAND_NAMES = {"star_jax.predict", "star_jax.export", "star_jax.convert", "star_jax.web",
                 "star_jax.clips", "star_jax.released", "star_jax.data.original_formats"}


def _is_entry_point(module: str) -> bool:
  return (module == "star_jax.commands" or module.startswith("star_jax.commands.")
          or module in COMMAND_NAMES)


def test_the_root_shows_its_parts():
  root_modules = sorted(name[:-3] for name in os.listdir(PACKAGE)
                        if name.endswith(".py") and name != "__init__.py")
  assert len(root_modules) <= 8, root_modules
  for name in os.listdir(PACKAGE):
    init = os.path.join(PACKAGE, name, "__init__.py")
    if os.path.isfile(init):
      doc = ast.get_docstring(ast.parse(open(init, encoding="utf-8").read()))
      assert doc, f"star_jax/{name}/__init__.py says nothing of what the package owns"
  for module in COMMAND_NAMES:
    tree = ast.parse(open(_modules()[module], encoding="utf-8").read())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported == [f"star_jax.commands.{module.rpartition('.')[2]}"], (module, imported)


def _outside_main_block(tree: ast.AST):
  skip = {id(n) for block in ast.walk(tree) if _is_main_block(block) for n in ast.walk(block)}
  return (n for n in ast.walk(tree) if id(n) not in skip)


def _process_changes(tree: ast.AST) -> list[str]:
  """What a statement of the module does to the process: environment writes, stream
  replacement, printing."""
  found = []
  for node in _outside_main_block(tree):
    if isinstance(node, ast.Call):
      func = node.func
      if isinstance(func, ast.Name) and func.id == "print":
        found.append(f"line {node.lineno}: print(")
      elif (isinstance(func, ast.Attribute) and func.attr in ("update", "pop", "setdefault",
                                                                "clear", "__setitem__")
            and ast.unparse(func.value) == "os.environ"):
        found.append(f"line {node.lineno}: os.environ.{func.attr}(")
      elif isinstance(func, ast.Attribute) and ast.unparse(func) in ("os.putenv", "os.unsetenv"):
        found.append(f"line {node.lineno}: {ast.unparse(func)}(")
    targets = []
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    elif isinstance(node, ast.Delete):
      targets = node.targets
    for target in targets:
      text = ast.unparse(target)
      if text.startswith("os.environ[") or text in ("sys.stderr", "sys.stdout", "sys.stdin"):
        found.append(f"line {node.lineno}: {text} =")
  return found


def _imported_names(tree: ast.AST, nodes=None) -> list[str]:
  """Every module name an import statement names (`from a import b` names `a` and `a.b`)."""
  names = []
  for node in ast.walk(tree) if nodes is None else nodes:
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names += [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
  return names


def _is_within(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


# The parsers of other styles: argparse is the one every command uses.
OTHER_PARSERS = ("absl.flags", "absl.app", "ml_collections.config_flags")


def _repository_sources() -> list[str]:
  found = []
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules",
                                                                       "__pycache__")]
    found += [os.path.join(folder, n) for n in files if n.endswith(".py")]
  return sorted(found)


def test_argparse_is_the_only_argument_parser():
  sources = _repository_sources()
  assert os.path.join(ROOT, "train.py") in sources and os.path.join(ROOT, "eval.py") in sources
  problems = []
  for path in sources:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for name in _imported_names(tree):
      if any(_is_within(name, other) for other in OTHER_PARSERS):
        problems.append(f"{os.path.relpath(path, ROOT)}: imports {name}")
  assert not problems, "\n".join(problems)


def test_train_and_eval_scripts_only_call_their_command():
  """The root scripts check the install, then hand the command line to star_jax/commands."""
  for script, command in (("train.py", "star_jax.commands.train"),
                          ("eval.py", "star_jax.commands.eval")):
    tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read(), script)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported == ["star_jax.commands", "star_jax.commands"], (script, imported)
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert names == ["cli", command.rpartition(".")[2]], (script, names)
    # The install check comes before the command's import (which needs the training install).
    code = [ast.unparse(n) for n in tree.body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert code[1] == f"cli.require_training_install({script!r})", (script, code)
    assert code[2].startswith(f"from {command.rpartition('.')[0]} import "), (script, code)


def test_library_modules_parse_no_arguments_and_leave_the_process_alone():
  """argparse belongs to star_jax/commands; so do environment writes, replacing
  sys.stderr/stdout, and print (the library logs)."""
  problems = []
  for module, path in sorted(_modules().items()):
    if _is_entry_point(module):
      continue
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for name in _imported_names(tree, _outside_main_block(tree)):
      if name == "argparse" or any(_is_within(name, other) for other in OTHER_PARSERS):
        problems.append(f"{module}: imports {name}")
    problems += [f"{module}: {p}" for p in _process_changes(tree)]
  assert not problems, "\n".join(problems)


def test_every_registry_is_the_one_helper():
  from star_jax.core import losses
  from star_jax.data import sources
  from star_jax.deploy import detection
  from star_jax.deploy.runtime import contract
  from star_jax.models import registry as models_registry
  from star_jax.registry import Registry
  for registry in (models_registry.MODELS, losses._TERMS, detection.DETECTORS,
                   sources.SOURCE_KINDS, contract.EXPORT_FORMATS):
    assert isinstance(registry, Registry), registry
  assert contract.FORMATS == ("onnx", "tflite", "savedmodel", "stablehlo")
  assert contract.RUNTIME_FORMATS == ("onnx", "tflite")
  assert sorted(detection.names()) == ["blazeface", "blazeface_full", "dlib_hog", "dlib_mmod",
                                       "lbp"]
  # No other module-level name -> entry table beside them (a dict of classes or functions
  # whose name says it registers).
  for module, path in _modules().items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in tree.body:
      if isinstance(node, (ast.Assign, ast.AnnAssign)):
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        name = ast.unparse(target)
        if any(word in name.upper() for word in ("REGISTRY", "_TERMS", "DETECTORS")):
          assert "Registry(" in ast.unparse(node.value), (module, name)
