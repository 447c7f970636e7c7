"""The package's layering: no import cycle, and the lower layers import nothing above them.

Every `import` in jaxseg's source counts, also those inside functions (which hide a cycle at
run time but not from a reader). Layers, bottom up:
- BOTTOM: errors, atomic, cache, compile_options, seeds, sharding, state (import nothing above);
- KERNELS: models, cpu_conv, data, classical, metrics, losses, surface (arrays in, arrays out; may
  import BOTTOM and each other);
- everything else (objectives, steps, optim, inference, checkpoint, train, paradigms, report,
  validate, the command-line tools, classical_run) on top.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxseg"
BOTTOM = {"errors", "atomic", "cache", "compile_options", "seeds", "sharding", "state"}
KERNELS = {"models", "cpu_conv", "data", "classical", "metrics", "losses", "surface"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
  """{module: set of jaxseg modules it imports anywhere in its source}."""
  paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in paths.items():
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
      else:
        continue
      for target in targets:
        while target and target not in paths:
          target = target.rsplit(".", 1)[0] if "." in target else ""
        if target and target != name:
          deps.add(target)
    graph[name] = deps
  return graph


def cycles(graph: dict) -> list:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _layer(module: str) -> str:
  top = module.split(".")[1] if "." in module else ""
  return "bottom" if top in BOTTOM else "kernels" if top in KERNELS else "top"


def test_the_checker_finds_a_cycle_and_an_upward_import():
  graph = {"jaxseg.a": {"jaxseg.b"}, "jaxseg.b": {"jaxseg.c"}, "jaxseg.c": {"jaxseg.a"}, "jaxseg.d": set()}
  assert cycles(graph) == [["jaxseg.a", "jaxseg.b", "jaxseg.c"]]
  assert cycles({"jaxseg.a": {"jaxseg.b"}, "jaxseg.b": set()}) == []
  assert [_layer(m) for m in ("jaxseg.errors", "jaxseg.models.unet", "jaxseg.train")] == [
      "bottom", "kernels", "top"]


def test_no_import_cycle():
  graph = import_graph()
  assert "jaxseg.train" in graph and "jaxseg.models.unet" in graph
  assert cycles(graph) == []


@pytest.mark.parametrize("layer,allowed", [("bottom", {"bottom"}), ("kernels", {"bottom", "kernels"})])
def test_lower_layers_import_nothing_above_them(layer, allowed):
  upward = sorted((m, d) for m, deps in import_graph().items() if _layer(m) == layer
                  for d in deps if _layer(d) not in allowed)
  assert upward == []
