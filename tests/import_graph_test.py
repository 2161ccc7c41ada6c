"""The package's import graph: no cycles (imports inside functions included) and the layers of docs/design.md."""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, 's2f_jax')

# Layer of each top-level part of s2f_jax (docs/design.md): a module may import only from its own layer or below.
LAYERS = {
    'errors': 0, 'io': 0, 'compile_cache': 0, 'executors': 0, 'distributed': 0,  # plumbing; where sweeps and runs run
    'backend': 0,  # the platform-specific speed code (CPU lanes, run chunks, im2col convolution)
    'data': 1, 'models': 1, 'training': 1, 'analysis': 1, 'results': 1,  # building blocks, pure functions, figures
    'config': 2, 'methods': 2,  # the benchmark's configuration and its registered methods
    'experiment': 3, 'sweep': 3, 'visualize': 3, 'generalization': 3,  # runners of the benchmark
    'stitching': 4, 'transfer': 4, 'patching': 4, 'robust_fine_tune': 4, 'studies': 4, 'cli': 4,  # companion studies; all studies; the CLI
}


def _modules() -> dict[str, str]:
  """Dotted module name → file, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[name.removesuffix('.__init__')] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """Module → the package modules it imports anywhere in its file (top level or inside functions). `from a.b
  import c` points at a.b.c when c is a module, else at a.b; a package's implicit import of its parent is not an
  edge."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    is_package = path.endswith('__init__.py')
    edges = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = name.split('.')[:len(name.split('.')) + is_package - node.level]
          base = '.'.join(parts + ([node.module] if node.module else []))
        edges.update(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names)
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
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


def test_cycle_finder_finds_a_hand_made_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
  assert cycles(graph) == [['a', 'b', 'c']]


def test_no_import_cycles():
  assert cycles(import_graph()) == []


def _layer(module: str) -> int:
  part = module.split('.')[1] if '.' in module else ''
  return LAYERS[part] if part else 0


def test_every_module_imports_only_its_layer_or_below():
  graph = import_graph()
  assert {m.split('.')[1] for m in graph if '.' in m} == set(LAYERS)  # every part has a layer
  upward = sorted((m, d) for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
  assert upward == []
