#!/usr/bin/env python3
"""The module layers of src/, checked: every `crate::` path (in `use` lines and in code) must
point at a module of the same layer or one below, and the modules must import each other
without a circle. `./run test` runs this; docs/design.md draws the same layers.

A module is a file of src/ (`src/catalog.rs` is `catalog`) or a folder (`src/l1/*.rs` are all
`l1`: a folder is one idea, and its files may use each other). `lib.rs` is the wiring and may
use everything.

  python3 tools/layers.py          # exit 1 on an upward arrow, a circle or an unplaced module
  python3 tools/layers.py --graph  # print the arrows
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# From the bottom. A module may use modules of its own layer (without a circle) and below.
LAYERS = [
    ("ground", ["error", "gucs", "keys", "server_text", "spi", "stats", "typed_keys", "vary"]),
    ("catalog", ["catalog"]),
    ("tiers", ["l1", "l2", "source"]),
    ("invalidation", ["invalidation"]),
    ("read path", ["read_through"]),
    ("SQL surface", ["api"]),
    ("wiring", ["shmem", "lib"]),
]


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        if "bin" in path.relative_to(SRC).parts:
            continue
        mod = module_of(path)
        graph.setdefault(mod, set())
        code = strip_comments(path.read_text())
        targets = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code))
        # `use crate::{a, b::c}`
        for group in re.findall(r"\bcrate::\{([^}]*)\}", code):
            targets |= {t.strip().split("::")[0] for t in group.split(",") if t.strip()}
        # `super::x` from a folder's mod.rs or sibling reaches outside the folder only via crate::.
        graph[mod] |= {t for t in targets if t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    graph = edges()
    level = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    if "--graph" in sys.argv:
        for m in sorted(graph, key=lambda m: (level.get(m, -1), m)):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    bad = []
    for m in sorted(graph):
        if m not in level:
            bad.append(f"{m}: in no layer (add it to LAYERS in tools/layers.py and to docs/design.md)")
            continue
        for t in sorted(graph[m]):
            if t in level and level[t] > level[m]:
                bad.append(f"{m} ({LAYERS[level[m]][0]}) -> {t} ({LAYERS[level[t]][0]}): points up")
    for comp in cycles(graph):
        bad.append(f"circle: {', '.join(comp)}")
    for b in bad:
        print(f"layers: {b}", file=sys.stderr)
    if not bad:
        print(f"layers: {len(graph)} modules in {len(LAYERS)} layers, every arrow down, no circle")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
