"""Package shape: no import cycles, imports only downward, JAX-free configs, SPEC cites, sizes.

The layer order (LAYERS below, lowest first) is the one docs/DESIGN.md states in words. Imports are
read from the source with `ast` (lazy imports inside functions count), never by importing.
"""

import ast
import fnmatch
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('mp_jax', 'configs')
# Lowest layer first; a module may import its own layer or lower ones. `X` claims the module X
# (for a package, its __init__.py), `X.*` everything under it.
LAYERS = (
    ('mp_jax.fsio', 'mp_jax.methods', 'mp_jax.heap'),
    ('mp_jax.data', 'mp_jax.data.*'),
    ('mp_jax.model', 'mp_jax.model.*'),
    ('mp_jax.workdir', 'configs', 'configs.*'),
    ('mp_jax.serving', 'mp_jax.serving.*'),
    ('mp_jax.evaluation', 'mp_jax.evaluation.*'),
    ('mp_jax.training', 'mp_jax.training.*'),
    ('mp_jax.cli', 'mp_jax'),
)
SPEC = ROOT / 'docs' / 'SPEC.md'
OLD_SPEC = 'shared/SPEC' + '.md'  # split so this file does not cite it itself
MAX_LINES = 400
MAX_SCRIPT_LINES = 60


def find_modules(root, packages=PACKAGES):
  """{module name: path} for every .py under root/<package>, a package named by its __init__.py."""
  modules = {}
  for package in packages:
    for path in sorted((root / package).rglob('*.py')):
      parts = list(path.relative_to(root).with_suffix('').parts)
      if parts[-1] == '__init__':
        parts.pop()
      modules['.'.join(parts)] = path
  return modules


def _known(name, modules):
  """The longest prefix of the dotted name that is a module of ours (None if none is)."""
  parts = name.split('.')
  for n in range(len(parts), 0, -1):
    if '.'.join(parts[:n]) in modules:
      return '.'.join(parts[:n])
  return None


def find_imports(name, path, modules):
  """[(line, imported module)] for every import of one of our modules in the file, lazy included."""
  is_package = path.name == '__init__.py'
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, _known(a.name, modules)) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from the file's package, up level - 1
        package = name.split('.') if is_package else name.split('.')[:-1]
        package = package[:len(package) - node.level + 1]
        base = '.'.join(package + ([node.module] if node.module else []))
      for a in node.names:  # a name imported from a package is a submodule if that file exists
        sub = f'{base}.{a.name}'
        found.append((node.lineno, sub if sub in modules else _known(base, modules)))
  return sorted((line, target) for line, target in found if target and target != name)


def import_edges(root, modules):
  """[(file, line, module, imported module)] over all modules."""
  return [(path.relative_to(root).as_posix(), line, name, target)
          for name, path in modules.items() for line, target in find_imports(name, path, modules)]


def find_cycles(graph):
  """One cycle ['a', 'b', 'a'] per strongly connected component that has one (Tarjan)."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = set(stack[stack.index(v):])
      del stack[stack.index(v):]
      on_stack.difference_update(scc)
      sccs.append(scc)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for scc in sccs:
    start = min(scc)
    if len(scc) == 1 and start not in graph.get(start, ()):
      continue
    # Shortest way back to start inside the component (breadth first).
    parent, frontier = {}, [start]
    while start not in parent:
      nxt = []
      for v in frontier:
        for w in sorted(graph.get(v, ())):
          if w in scc and w not in parent:
            parent[w] = v
            nxt.append(w)
      frontier = nxt
    path = [start]
    while len(path) == 1 or path[-1] != start:
      path.append(parent[path[-1]])
    cycles.append(path[::-1])
  return sorted(cycles)


def layers_of(module, layers=LAYERS):
  """Indices of the layers that claim the module (exactly one when the layering is complete)."""
  return [k for k, patterns in enumerate(layers)
          if any(fnmatch.fnmatchcase(module, p) for p in patterns)]


def unlayered(names, layers=LAYERS):
  """The modules that no layer, or more than one, claims."""
  return sorted(f'{m} (claimed by {[f"L{k}" for k in layers_of(m, layers)] or "no layer"})'
                for m in names if len(layers_of(m, layers)) != 1)


def upward_edges(edges, layers=LAYERS):
  """'file:line: module -> imported (Lk -> Lj)' for every import of a higher layer."""
  out = []
  for file, line, src, dst in edges:
    (k,), (j,) = layers_of(src, layers), layers_of(dst, layers)
    if j > k:
      out.append(f'{file}:{line}: {src} -> {dst} (L{k} -> L{j})')
  return out


def _repo_edges():
  modules = find_modules(ROOT)
  return modules, import_edges(ROOT, modules)


def test_no_import_cycle():
  modules, edges = _repo_edges()
  graph = {m: set() for m in modules}
  for _, _, src, dst in edges:
    graph[src].add(dst)
  cycles = [' -> '.join(c) for c in find_cycles(graph)]
  assert not cycles, 'import cycles:\n' + '\n'.join(cycles)


def test_imports_point_downward():
  modules, edges = _repo_edges()
  assert 'mp_jax.data.tokenization' in modules and len(edges) > 20  # the scan sees the package
  missing = unlayered(modules)
  assert not missing, 'modules not in exactly one layer:\n' + '\n'.join(missing)
  bad = upward_edges(edges)
  assert not bad, 'imports of a higher layer:\n' + '\n'.join(bad)


def test_configs_import_no_jax():
  code = ("import sys; import configs.base, configs.qqp; configs.qqp.get_config('smoke'); "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'jaxlib'}))")
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == '[]', f'importing configs loaded: {r.stdout.strip()}'


def _cited_files():
  files = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
  for folder in ('mp_jax', 'configs', 'experiments', 'tests'):
    files += sorted((ROOT / folder).rglob('*.py'))
  return [f for f in files if f.is_file()]


def test_spec_sections_cited_exist():
  problems = []
  if SPEC.is_file():
    sections = set(re.findall(r'^## (\d+)\.', SPEC.read_text(), re.M))
  else:
    problems.append('docs/SPEC.md missing')
    sections = None
  for path in _cited_files():
    name = path.relative_to(ROOT).as_posix()
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if sections is not None:
        problems += [f'{name}:{i} cites §{n}' for n in re.findall(r'SPEC §(\d+)', line)
                     if n not in sections]
      if OLD_SPEC in line:
        problems.append(f'{name}:{i} points at {OLD_SPEC}')
  assert not problems, '\n'.join(problems)


def test_file_sizes():
  limits = [(p, MAX_LINES) for folder in ('mp_jax', 'configs', 'experiments')
            for p in sorted((ROOT / folder).rglob('*.py'))]
  limits += [(ROOT / name, MAX_SCRIPT_LINES) for name in ('train.py', 'eval.py', 'bench.py')]
  big = [f'{p.relative_to(ROOT).as_posix()}: {n} lines (limit < {limit})' for p, limit in limits
         if (n := len(p.read_text().splitlines())) >= limit]
  assert not big, 'files too long:\n' + '\n'.join(big)


# The checkers themselves, on synthetic inputs: each can fail.


def test_find_cycles_names_the_cycle():
  assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []
  assert find_cycles({'a': {'b'}, 'b': {'a', 'c'}, 'c': set()}) == [['a', 'b', 'a']]
  assert find_cycles({'x': {'x'}}) == [['x', 'x']]
  cycles = find_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'e'}, 'e': {'d', 'a'}})
  assert cycles == [['a', 'b', 'c', 'a'], ['d', 'e', 'd']]


def test_upward_edges_and_unlayered_on_synthetic_layers():
  layers = (('p.low', 'p.low.*'), ('p.high', 'p'))
  edges = [('p/high.py', 3, 'p.high', 'p.low.x'), ('p/low/x.py', 7, 'p.low.x', 'p.high'),
           ('p/low/__init__.py', 1, 'p.low', 'p.low.x')]
  assert upward_edges(edges, layers) == ['p/low/x.py:7: p.low.x -> p.high (L0 -> L1)']
  assert unlayered(['p', 'p.low', 'p.low.x', 'p.high', 'p.new'], layers) == [
      "p.new (claimed by no layer)"]
  assert unlayered(['p.low.x'], (('p.low.*',), ('p.low.x',))) == [
      "p.low.x (claimed by ['L0', 'L1'])"]
  assert layers_of('mp_jax.data.splits') == [1] and layers_of('mp_jax') == [7]
  assert layers_of('configs.qqp') == [3] and layers_of('mp_jax.newpkg.x') == []


def test_import_resolution_on_synthetic_package(tmp_path):
  files = {
      'p/__init__.py': 'from p import cli\n',
      'p/cli.py': 'import os\nimport p.sub.mod as m\n\n\ndef f():\n  from p.sub import SYMBOL\n',
      'p/io.py': 'from p import sub\nfrom p.sub import mod, other\n',
      'p/sub/__init__.py': 'from . import mod\nfrom .mod import g\nSYMBOL = 1\n',
      'p/sub/mod.py': 'import numpy\nfrom ..io import x\nfrom p.sub.mod import y\n',
      'q/__init__.py': '',
      'q/base.py': 'from p import io\nimport q\n',
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  modules = find_modules(tmp_path, ('p', 'q'))
  assert sorted(modules) == ['p', 'p.cli', 'p.io', 'p.sub', 'p.sub.mod', 'q', 'q.base']
  assert sorted((s, d, line) for _, line, s, d in import_edges(tmp_path, modules)) == [
      ('p', 'p.cli', 1),
      ('p.cli', 'p.sub', 6),  # lazy, a symbol of the package
      ('p.cli', 'p.sub.mod', 2),
      ('p.io', 'p.sub', 1),
      ('p.io', 'p.sub', 2),  # `other` is no file: a symbol of p.sub
      ('p.io', 'p.sub.mod', 2),
      ('p.sub', 'p.sub.mod', 1),
      ('p.sub', 'p.sub.mod', 2),
      ('p.sub.mod', 'p.io', 2),  # relative, two levels
      ('q.base', 'p.io', 1),
      ('q.base', 'q', 2),
  ]
