"""Print (JSON) the import cycles between the modules of the given packages: ``python import_cycles.py PKG...``.

Every import counts, also function-local and TYPE_CHECKING ones (grimp's graph); a cycle is a
strongly connected group of two or more modules (Tarjan, iterative).
"""

from __future__ import annotations

import json
import sys

import grimp


def cycles(packages: list[str]) -> list[list[str]]:
    graph = grimp.build_graph(*packages, cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def enter(node: str) -> tuple[str, object]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(sorted(graph.find_modules_directly_imported_by(node)))

    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [enter(root)]
        while work:
            node, children = work[-1]
            child = next(children, None)  # type: ignore[call-overload]
            if child is not None:
                if child not in index:
                    work.append(enter(child))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


if __name__ == "__main__":
    print(json.dumps(cycles(sys.argv[1:])))
