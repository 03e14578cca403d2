"""The import graph of dsv3/, parallel/ and triton_kernels/, read with ``ast`` (imports at module level
and inside functions alike, relative imports resolved, ``from pkg import submodule`` an edge to the
submodule), has no cycle, and every import follows the layer table ``RULES``: the model imports only
torch, the kernels only torch and triton, ``parallel`` the model and the public training interfaces
(never the trainer command or the tools), and nothing below ``dsv3.train`` imports it.

``dsv3.checkpoint`` does not import ``parallel``: it reads every checkpoint format on one process
(``dsv3.checkpoint.sharded`` the sharded one, ``store.load_any_checkpoint`` either kind), and
``parallel.dist_checkpoint`` (each rank saving and loading its ZeRO shards) builds on it."""
from __future__ import annotations

import ast
import functools
import os
import sys
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dsv3", "parallel", "triton_kernels")
STDLIB = set(sys.stdlib_module_names)

# what every module may import, by the longest matching module prefix: (internal prefixes, third-party tops).
# The standard library is always allowed. LEAVES import no module of the three packages, so every layer may
# read them: the error types, the table of GPU peaks (the trainer's MFU reads it) and the pipeline schedules
# as data (config validation and the batch split read the registered kinds).
LEAVES = ["dsv3.errors", "dsv3.tools.hardware", "parallel.schedules"]
_MODEL = ["dsv3.model"]
_BASE = ["dsv3.config", *LEAVES]
_CHECKPOINT = ["dsv3.checkpoint", "dsv3.data", "dsv3.training.faults", "triton_kernels", *_MODEL, *_BASE]
_TRAINING = ["dsv3.training", "dsv3.checkpoint", "dsv3.data", "triton_kernels", *_MODEL, *_BASE]
_PARALLEL = ["parallel", *_TRAINING]
RULES: dict[str, tuple[list[str], list[str]]] = {
    "dsv3": ([], []),
    "dsv3.model": (_MODEL, ["torch"]),
    "dsv3.config": (["dsv3.model", "dsv3.data.batch", *_BASE], ["yaml"]),   # the model's section is the model's
    "dsv3.config_doc": (_BASE, []),
    "dsv3.data": (["dsv3.data", *_BASE], ["torch", "numpy", "tokenizers", "sentencepiece"]),
    "dsv3.checkpoint": (_CHECKPOINT, ["torch", "safetensors", "tokenizers", "yaml"]),
    "dsv3.training": (_TRAINING, ["torch", "yaml", "tqdm", "wandb"]),
    "triton_kernels": (["triton_kernels"], ["torch", "triton"]),
    "triton_kernels.te_backend": (["triton_kernels", "dsv3.errors"], ["torch", "transformer_engine"]),
    "parallel": (_PARALLEL, ["torch"]),
    "parallel.simulate": (_PARALLEL, ["torch", "matplotlib"]),   # the schedule plots
    "dsv3.train": (["dsv3.config_doc", "dsv3.tools.plots", *_PARALLEL], ["torch", "yaml"]),   # the loss curve
    "dsv3.tools": (["dsv3", "parallel", "triton_kernels"], ["torch", "yaml", "matplotlib"]),
}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_files(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: file} for every .py file of PACKAGES (a package is its __init__.py)."""
    mods = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), root)[:-3]
                    mods[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(folder, f)
    return mods


def imports_of(name: str, path: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of the module, wherever it sits. A known
    module is named exactly (``from a import b`` names a.b when that is a module, else a); any other
    by its top-level name (torch, yaml, os...)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    out = []

    def add(target: str, line: int) -> None:
        parts = target.split(".")
        for n in range(len(parts), 0, -1):   # the longest known prefix: `import a.b.c` runs a.b.c
            if ".".join(parts[:n]) in known:
                out.append((".".join(parts[:n]), line))
                return
        out.append((parts[0], line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else module, node.lineno)
    return out


@functools.lru_cache(maxsize=None)   # read once for the tests below
def import_graph(root: str = ROOT) -> dict[str, list[tuple[str, int]]]:
    mods = module_files(root)
    return {m: imports_of(m, p, set(mods)) for m, p in sorted(mods.items())}


def _edges(graph) -> dict[str, list[str]]:
    return {m: sorted({t for t, _ in deps if t in graph and t != m}) for m, deps in graph.items()}


def tangles(graph: dict[str, list[tuple[str, int]]]) -> list[set[str]]:
    """The strongly connected groups of more than one module: each module of a group imports, through
    the others, every other one (Tarjan, iterative)."""
    edges = _edges(graph)
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = set()
                    while True:
                        x = stack.pop()
                        on_stack.discard(x)
                        group.add(x)
                        if x == v:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif w not in index:
                index[w] = low[w] = len(index)
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(edges[w])))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
    return groups


def find_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One shortest cycle (a, b, ..., a) through the first module (by name) of each tangle."""
    edges, cycles = _edges(graph), []
    for group in tangles(graph):
        first = min(group)
        parent, queue = {first: None}, deque([first])
        while queue:   # breadth first inside the group, back to `first`
            v = queue.popleft()
            for w in edges[v]:
                if w == first:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    cycles.append([first, *reversed(path[:-1]), first] if len(path) > 1 else [first, v, first])
                    queue.clear()
                    break
                if w in group and w not in parent:
                    parent[w] = v
                    queue.append(w)
    return cycles


def rule_for(module: str, rules=RULES) -> tuple[str, tuple[list[str], list[str]]]:
    keys = [k for k in rules if _matches(module, k)]
    if not keys:
        raise KeyError(module)
    key = max(keys, key=len)
    return key, rules[key]


def forbidden_imports(graph: dict[str, list[tuple[str, int]]], rules=RULES) -> list[str]:
    """Every import that the importer's rule does not allow, as 'module:line imports target (rule key)'."""
    internal = {m.split(".")[0] for m in graph}
    bad = []
    for module, deps in graph.items():
        try:
            key, (allowed, third_party) = rule_for(module, rules)
        except KeyError:
            bad.append(f"{module}: no rule in RULES")
            continue
        for target, line in deps:
            top = target.split(".")[0]
            if top in internal:
                ok = target == top == module.split(".")[0] or any(_matches(target, p) for p in allowed)
            else:
                ok = top in STDLIB or top in third_party
            if not ok:
                bad.append(f"{module}:{line} imports {target} (rule '{key}' allows {allowed + third_party})")
    return bad


def _cycle_text(graph, cycle: list[str]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line = min(ln for t, ln in graph[a] if t == b)
        steps.append(f"{a}:{line} -> {b}")
    return ", ".join(steps)


def test_no_import_cycles():
    graph = import_graph()
    assert {m.split(".")[0] for m in graph} == set(PACKAGES) and len(graph) > 80   # every package was walked
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-level imports count):\n" + "\n".join(
        f"{_cycle_text(graph, c)}  [tangle: {' '.join(sorted(g))}]" for c, g in zip(cycles, tangles(graph)))


def test_imports_follow_the_layers():
    graph = import_graph()
    bad = forbidden_imports(graph)
    assert not bad, "imports against RULES:\n" + "\n".join(bad)


def test_leaves_import_no_package_module():
    graph = import_graph()
    for leaf in LEAVES:
        inner = [t for t, _ in graph[leaf] if t.split(".")[0] in PACKAGES]
        assert not inner, (leaf, inner)


def test_nothing_below_the_trainer_imports_it():
    """dsv3.train (the command) is imported only by the tools (dsv3.tools.ablate runs it)."""
    graph = import_graph()
    importers = sorted(m for m, deps in graph.items() if any(t == "dsv3.train" for t, _ in deps))
    assert all(_matches(m, "dsv3.tools") for m in importers), importers


def test_the_checker_reports_a_cycle_and_a_forbidden_import():
    """The checker itself on a made-up graph: a three-module cycle through a function-level import, a
    model module importing parallel and numpy, a module no rule covers, and a clean part."""
    graph = {
        "dsv3.model.a": [("dsv3.model.b", 3), ("torch", 1), ("os", 2)],
        "dsv3.model.b": [("dsv3.model.c", 5)],
        "dsv3.model.c": [("dsv3.model.a", 40), ("parallel.mesh", 41), ("numpy", 42)],
        "parallel.x": [("dsv3.model.a", 1), ("dsv3.training.loop", 2)],
        "dsv3.training.loop": [("dsv3.model.a", 1)],
        "tests.helper": [],
    }
    assert find_cycles(graph) == [["dsv3.model.a", "dsv3.model.b", "dsv3.model.c", "dsv3.model.a"]]
    assert find_cycles({"a": [("b", 1)], "b": [("a", 1)], "c": [("a", 1)]}) == [["a", "b", "a"]]
    assert find_cycles({k: v for k, v in graph.items() if k != "dsv3.model.c"}) == []
    bad = forbidden_imports(graph)
    assert len(bad) == 3, bad
    assert bad[0].startswith("dsv3.model.c:41 imports parallel.mesh"), bad
    assert bad[1].startswith("dsv3.model.c:42 imports numpy"), bad
    assert bad[2] == "tests.helper: no rule in RULES", bad
    # the trainer command is above parallel: parallel importing it is refused, and so is importing the tools
    assert forbidden_imports({"parallel.x": [("dsv3.train", 7), ("dsv3.tools.generate", 8)]}) == [
        f"parallel.x:7 imports dsv3.train (rule 'parallel' allows {_PARALLEL + ['torch']})",
        f"parallel.x:8 imports dsv3.tools.generate (rule 'parallel' allows {_PARALLEL + ['torch']})"]


def test_imports_are_read_inside_functions_and_relative(tmp_path):
    """imports_of counts an import inside a function, resolves ``from . import x`` and ``from .. import y``,
    and names the submodule of ``from pkg import submodule``."""
    pkg = tmp_path / "dsv3" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "dsv3" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text("")
    (tmp_path / "dsv3" / "c.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from . import b\n    from .. import c\n"
                              "    from dsv3.sub import b as bb\n    import torch.nn\n")
    mods = module_files(str(tmp_path))
    assert set(mods) == {"dsv3", "dsv3.sub", "dsv3.sub.a", "dsv3.sub.b", "dsv3.c"}
    got = imports_of("dsv3.sub.a", mods["dsv3.sub.a"], set(mods))
    assert got == [("os", 1), ("dsv3.sub.b", 4), ("dsv3.c", 5), ("dsv3.sub.b", 6), ("torch", 7)], got
