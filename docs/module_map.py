"""Which top-level file imports which, as docs/modules.md shows it: `python docs/module_map.py`
prints each file after every file it imports, with those files beside it. The import graph and
its check for circles are the test suite's (tests/test_structure.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_structure import find_cycle, repo_imports  # noqa: E402

if __name__ == "__main__":
    graph = repo_imports()
    if cycle := find_cycle(graph):
        sys.exit(f"error: these files import each other: {' -> '.join(cycle)}")
    placed = []
    while len(placed) < len(graph):
        placed += sorted(m for m in graph if m not in placed and graph[m] <= set(placed))
    for module in placed:
        print(f"{module + '.py':<16} {', '.join(sorted(graph[module])) or '-'}")
