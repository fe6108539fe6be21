"""The table of docs/modules.md from the code: `python docs/module_map.py` prints it, each file
after every file it imports, with those files beside it and what it owns as the table says now
("?" for a file the table lacks). The import graph and its check for circles are the test
suite's (tests/test_structure.py), which also checks the table against the code."""
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(DOCS), "tests"))
from test_structure import file_of, find_cycle, repo_imports  # noqa: E402

if __name__ == "__main__":
    graph = repo_imports()
    if cycle := find_cycle(graph):
        sys.exit(f"error: these files import each other: {' -> '.join(cycle)}")
    with open(os.path.join(DOCS, "modules.md"), encoding="utf-8") as f:
        owns = {row[1].strip().strip("`"): row[2].strip() for row in (line.split("|") for line in f)
                if len(row) > 3 and row[1].strip().startswith("`")}
    placed = []
    while len(placed) < len(graph):
        placed += sorted(m for m in graph if m not in placed and graph[m] <= set(placed))
    print("| file | owns | imports (of this repo) |\n| --- | --- | --- |")
    for module in placed:
        imports = ", ".join(sorted(file_of(m)[:-3] for m in graph[module])) or "-"
        print(f"| `{file_of(module)}` | {owns.get(file_of(module), '?')} | {imports} |")
