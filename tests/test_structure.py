"""The repo's layout: flat files whose imports run one way."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_imports():
    """{module: the repo's top-level modules it imports anywhere in its file (also inside functions)}."""
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    graph = {}
    for module in modules:
        with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[module] = found & modules - {module}
    return graph


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
    # the entry points sit on top: nothing imports them but benchmark.py, which times them
    for script in ("train", "predict", "export"):
        users = sorted(m for m, deps in graph.items() if script in deps and m != "benchmark")
        assert not users, f"{script}.py is imported by {users}"


def test_a_cycle_is_found_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
