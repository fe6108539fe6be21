"""The repo's layout: flat files whose imports run one way."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_imports():
    """{module: the repo's modules it imports anywhere in its file (also inside functions)}: the
    top-level files, and benchmark.py's files in benchmarks/ as "benchmarks.NAME"."""
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    modules |= {"benchmarks." + name[:-3] for name in os.listdir(os.path.join(ROOT, "benchmarks"))
                if name.endswith(".py") and name != "__init__.py"}
    graph = {}
    for module in modules:
        with open(os.path.join(ROOT, module.replace(".", os.sep) + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name if alias.name in modules else alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "benchmarks" and node.level == 0:
                found |= {"benchmarks." + alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module if node.module in modules else node.module.split(".")[0])
        graph[module] = found & modules - {module}
    return graph


def file_of(module):
    """benchmarks.steps -> benchmarks/steps.py"""
    return module.replace(".", "/") + ".py"


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_imports_between_the_scripts_run_one_way():
    graph = repo_imports()
    assert {"train", "predict", "export", "utils", "model"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the entry points sit on top: nothing imports them but the benchmark, which times them, and
    # serve.py, whose answers are predict.py's by construction (its own functions, not a copy)
    for script in ("train", "predict", "export", "serve"):
        users = sorted(m for m, deps in graph.items() if script in deps and not m.startswith("benchmark")
                       and (m, script) != ("serve", "predict"))
        assert not users, f"{script}.py is imported by {users}"


def test_a_cycle_is_found_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_map_in_docs_names_every_file_and_what_it_imports():
    """docs/modules.md's table lists each top-level file once, with the repo's files it imports as
    the code has them: the map a reader trusts cannot drift from the house."""
    graph = repo_imports()
    with open(os.path.join(ROOT, "docs", "modules.md"), encoding="utf-8") as f:
        rows = [line.split("|") for line in f if line.startswith("| `")]
    listed = {}
    for row in rows:
        name = row[1].strip().strip("`")
        assert name.endswith(".py") and name not in listed, f"{name} listed twice or not a .py file"
        imports = row[3].strip()
        listed[name] = set() if imports == "-" else {m.strip() for m in imports.split(",")}
    files = {file_of(m): {file_of(d)[:-3] for d in deps} for m, deps in graph.items()}
    assert set(listed) == set(files), f"not in the map: {set(files) - set(listed)}; gone: {set(listed) - set(files)}"
    for name, deps in files.items():
        assert listed[name] == deps, f"{name} imports {sorted(deps)}, the map says {sorted(listed[name])}"
