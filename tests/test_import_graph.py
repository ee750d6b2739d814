"""The modules of vpfast import each other in one direction only: no module imports (directly or through
others) a module that imports it. A cycle makes the import order decide which names exist when, and makes
each side impossible to read or change without the other (vpfast.train and vpfast.evaluate once did this)."""
import ast
import os

import vpfast

PKG = os.path.dirname(os.path.abspath(vpfast.__file__))


def _modules():
    """{dotted name: path} of the package's own Python files (the kernels/benchmarks links excluded: they are
    separate top-level directories of the repository)."""
    out = {}
    for root, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d)) and d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _is_main_guard(node):
    # `if __name__ == "__main__":` runs only when the file is the program (python -m vpfast.train); the
    # module imported as vpfast.train never executes it
    t = node.test
    return (isinstance(node, ast.If) and isinstance(t, ast.Compare) and isinstance(t.left, ast.Name)
            and t.left.id == "__name__")


def _imports(name, path, modules):
    """The vpfast modules `name` imports anywhere in its body (functions included: a lazy import is still a
    dependency), resolved to the most specific module that exists."""
    is_pkg = path.endswith("__init__.py")
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_main_guard(child):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                found.add(mod)
                for a in child.names:
                    found.add(f"{mod}.{a.name}")
            visit(child)

    visit(ast.parse(open(path).read(), path))
    out = set()
    for m in found:
        while m and m not in modules:  # vpfast.ops.ddr_loss.ddr_loss (a function) -> vpfast.ops.ddr_loss
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


def _cycle(graph):
    """One cycle of the graph as a list of names, or None."""
    state, stack = {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = dfs(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = dfs(n)
            if c:
                return c
    return None


def test_no_import_cycle_between_vpfast_modules():
    modules = _modules()
    assert {"vpfast", "vpfast.train", "vpfast.evaluate", "vpfast.commands"} <= set(modules)
    # a module importing its own package (the package __init__ is imported first anyway) is not a cycle
    graph = {n: {m for m in _imports(n, p, modules) if not n.startswith(m + ".")} for n, p in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_a_cycle():
    # its own check: a two-module cycle and a lazy (in-function) import are found
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    src = "def f():\n    from .evaluate import x\n"
    tree_mods = {"vpfast.train": None, "vpfast.evaluate": None}
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    try:
        assert _imports("vpfast.train", f.name, tree_mods) == {"vpfast.evaluate"}
    finally:
        os.unlink(f.name)
