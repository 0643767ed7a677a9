"""Reference implementations nobody here wrote: single functions of TRL and verl, run from their sources.

TRL and verl are installed `--no-deps` (pinned in the Makefile): their loss code needs only torch, but
importing their packages would pull accelerate, datasets, pandas, ray, omegaconf, ... . So the tests read
the pinned release's source file, take the named function (or a class's method) out of it with `ast`,
unchanged except for its decorators (registries), and execute it with the names it uses: torch and,
for the few helpers it calls, other functions taken from the same release the same way. A method runs
with a stand-in `self` that carries the trainer's configuration values and, where the method would call
a model, returns the log-probabilities under test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os

import pytest

PINS = {"trl": "1.16.0", "verl": "0.9.1"}


def source_file(dist: str, relpath: str) -> str:
  """Path of `relpath` inside the installed package `dist` (found without importing it)."""
  spec = importlib.util.find_spec(dist)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"{dist}=={PINS[dist]} is not installed (make setup-test installs it --no-deps)")
  version = importlib.metadata.version(dist)
  if version != PINS[dist]:
    raise RuntimeError(f"{dist} {version} is installed; the tests pin {PINS[dist]}")
  return os.path.join(spec.submodule_search_locations[0], relpath)


def load(dist: str, relpath: str, names: list[str], namespace: dict) -> dict:
  """Execute the definitions `names` ("func" or "Class.method") of dist/relpath in `namespace`; returns
  {name: function}. Each is compiled from the file's own text (so tracebacks point into it)."""
  path = source_file(dist, relpath)
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  out = {}
  for name in names:
    owner, _, method = name.partition(".")
    node = top[owner]
    if method:
      node = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    node.decorator_list = []
    ns = namespace
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), ns)
    out[name] = ns[node.name]
  return out
