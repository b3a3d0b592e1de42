"""A layered ("Sugiyama-style") layout of a small directed graph, for the dashboard's topology.

Pure geometry, no I/O: nodes go into columns by the longest path from a caller with no callers
(cycles are broken by ignoring DFS back edges), then rows within a column are ordered by the
barycentre of their neighbours, a few sweeps forth and back, which removes most crossings of
the small graphs a mesh draws. An edge that spans several columns gets a placeholder row in each
column it crosses (so it never runs through a box, and its label has a slot of its own). Edges
are cubic Bézier curves; the dashboard renders them as SVG.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["EdgeGeometry", "GraphLayout", "NodeBox", "layered_layout"]

NODE_WIDTH = 176.0
NODE_HEIGHT = 58.0
COLUMN_GAP = 190.0  # room for an edge's label between two columns
ROW_GAP = 46.0
MARGIN = 24.0
_SWEEPS = 4


@dataclass(frozen=True, slots=True)
class NodeBox:
    name: str
    layer: int
    row: int
    x: float
    y: float
    width: float = NODE_WIDTH
    height: float = NODE_HEIGHT


@dataclass(frozen=True, slots=True)
class EdgeGeometry:
    source: str
    target: str
    path: str  # SVG path data
    label_x: float
    label_y: float
    kind: str  # "forward", "back" (against the layering, or within a column) or "self"


@dataclass(frozen=True, slots=True)
class GraphLayout:
    nodes: dict[str, NodeBox]
    edges: list[EdgeGeometry] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def _back_edges(nodes: list[str], succ: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Edges that close a cycle in a depth-first search from the nodes in order."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    back: set[tuple[str, str]] = set()
    for root in nodes:
        if root in state:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        state[root] = 1
        while stack:
            node, i = stack[-1]
            children = succ[node]
            if i < len(children):
                stack[-1] = (node, i + 1)
                child = children[i]
                if state.get(child) == 1:
                    back.add((node, child))
                elif child not in state:
                    state[child] = 1
                    stack.append((child, 0))
            else:
                state[node] = 2
                stack.pop()
    return back


def _layers(nodes: list[str], edges: set[tuple[str, str]]) -> dict[str, int]:
    """Longest path from a source, over an acyclic edge set."""
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    indegree = dict.fromkeys(nodes, 0)
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        succ[a].append(b)
        preds[b].append(a)
        indegree[b] += 1
    layer = dict.fromkeys(nodes, 0)
    ready = [n for n in nodes if indegree[n] == 0]
    while ready:
        node = ready.pop(0)
        for child in sorted(succ[node]):
            layer[child] = max(layer[child], layer[node] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    return layer


def layered_layout(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> GraphLayout:
    """Place ``nodes`` in columns left to right (callers before callees) and route ``edges``."""
    names = sorted(set(nodes))
    pairs = sorted({(a, b) for a, b in edges})
    for a, b in pairs:
        for n in (a, b):
            if n not in names:
                names.append(n)
    names.sort()
    connected = {n for pair in pairs for n in pair}
    # Nodes with edges first, so that idle agents end up below the traffic.
    order = [n for n in names if n in connected] + [n for n in names if n not in connected]
    succ: dict[str, list[str]] = {n: [] for n in order}
    for a, b in pairs:
        if a != b:
            succ[a].append(b)
    back = _back_edges(order, succ)
    dag = {(a, b) for a, b in pairs if a != b and (a, b) not in back}
    layer = _layers(order, dag)

    # Edges longer than one column pass through a placeholder in every column they cross, so
    # that they get a row of their own there instead of running through other boxes.
    chains: dict[tuple[str, str], list[str]] = {}
    for a, b in sorted(dag):
        chain = [a]
        for li in range(layer[a] + 1, layer[b]):
            dummy = f"\0{a}\0{b}\0{li}"
            layer[dummy] = li
            chain.append(dummy)
        chains[(a, b)] = [*chain, b]

    columns: list[list[str]] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for n in order + [d for chain in chains.values() for d in chain[1:-1]]:
        columns[layer[n]].append(n)
    neighbours: dict[str, list[str]] = {n: [] for n in layer}
    for chain in chains.values():
        for u, v in itertools.pairwise(chain):
            neighbours[u].append(v)
            neighbours[v].append(u)

    def sweep(indices: Iterable[int], reference: int) -> None:
        for i in indices:
            j = i + reference
            if not 0 <= j < len(columns):
                continue
            position = {n: p for p, n in enumerate(columns[j])}
            keyed = []
            for p, n in enumerate(columns[i]):
                near = [position[m] for m in neighbours[n] if m in position]
                if near:
                    centre = sum(near) / len(near)
                else:  # keep its place; idle nodes stay below the others
                    centre = float(p) if neighbours[n] else float(len(layer) + p)
                keyed.append((centre, p, n))
            columns[i] = [n for _, _, n in sorted(keyed)]

    for _ in range(_SWEEPS):
        sweep(range(1, len(columns)), -1)
        sweep(range(len(columns) - 2, -1, -1), +1)

    tallest = max((len(c) for c in columns), default=0)
    boxes: dict[str, NodeBox] = {}
    for li, column in enumerate(columns):
        offset = (tallest - len(column)) * (NODE_HEIGHT + ROW_GAP) / 2
        for ri, n in enumerate(column):
            boxes[n] = NodeBox(
                name=n,
                layer=li,
                row=ri,
                x=MARGIN + li * (NODE_WIDTH + COLUMN_GAP),
                y=MARGIN + offset + ri * (NODE_HEIGHT + ROW_GAP),
            )
    width = 2 * MARGIN + len(columns) * NODE_WIDTH + max(len(columns) - 1, 0) * COLUMN_GAP
    height = 2 * MARGIN + tallest * NODE_HEIGHT + max(tallest - 1, 0) * ROW_GAP
    if any(a != b and (a, b) not in chains for a, b in pairs):
        height += 70  # back edges loop below the lowest boxes
    real = {n: box for n, box in boxes.items() if n in names}
    obstacles = [(b.x - 4, b.y - 4, b.x + b.width + 4, b.y + b.height + 4) for b in real.values()]
    placed: list[_Rect] = []
    geometry: dict[tuple[str, str], EdgeGeometry] = {}
    # Long edges are labelled in their first placeholder's slot (free by construction); edges
    # to the next column at the first point along their curve where the label overlaps no box
    # and no other label, the steepest edges (most room to move) last.
    direct = []
    for key, through in chains.items():
        line = [boxes[n] for n in through]
        if len(line) > 2:
            slot = line[1]
            lx, ly = slot.x + slot.width / 2, slot.y + slot.height / 2
            geometry[key] = _forward(line, lx, ly)
            placed.append(_label_rect(lx, ly))
        else:
            direct.append(line)
    direct.sort(key=lambda line: abs(line[1].y - line[0].y))
    for line in direct:
        candidates = [_bezier_point(line[0], line[1], t) for t in _LABEL_TS]

        def cost(point: tuple[float, float]) -> float:
            rect = _label_rect(*point)
            return sum(_overlap(rect, other) for other in (*placed, *obstacles))

        lx, ly = min(candidates, key=cost)  # min keeps the first of equals: t = 0.5 if free
        geometry[(line[0].name, line[1].name)] = _forward(line, lx, ly)
        placed.append(_label_rect(lx, ly))
    routed = [
        geometry[(a, b)] if (a, b) in geometry else _route(boxes[a], boxes[b], height)
        for a, b in pairs
    ]
    return GraphLayout(nodes=real, edges=routed, width=width, height=max(height, 120.0))


_Rect = tuple[float, float, float, float]
#: Where along an edge to the next column its label may go, in order of preference.
_LABEL_TS = (0.5, 0.38, 0.62, 0.28, 0.72, 0.2, 0.8)
#: The room an edge label takes (two lines of 12 px text, centred on the point).
LABEL_WIDTH = 150.0
LABEL_HEIGHT = 32.0


def _label_rect(x: float, y: float) -> _Rect:
    return (x - LABEL_WIDTH / 2, y - LABEL_HEIGHT / 2, x + LABEL_WIDTH / 2, y + LABEL_HEIGHT / 2)


def _overlap(a: _Rect, b: _Rect) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _bezier_point(a: NodeBox, b: NodeBox, t: float) -> tuple[float, float]:
    """The point at ``t`` of the curve from ``a``'s right side to ``b``'s left side."""
    x1, y1 = a.x + a.width, a.y + a.height / 2
    x2, y2 = b.x, b.y + b.height / 2
    cx1, cx2 = x1 + (x2 - x1) / 2, x2 - (x2 - x1) / 2
    u = 1 - t
    x = u**3 * x1 + 3 * u * u * t * cx1 + 3 * u * t * t * cx2 + t**3 * x2
    y = u**3 * y1 + 3 * u * u * t * y1 + 3 * u * t * t * y2 + t**3 * y2
    return x, y


def _forward(chain: list[NodeBox], label_x: float, label_y: float) -> EdgeGeometry:
    """Left to right: a curve to each next column, straight across each placeholder's slot."""
    first, last = chain[0], chain[-1]
    x, y = first.x + first.width, first.y + first.height / 2
    parts = [f"M{x:.1f},{y:.1f}"]
    for box in chain[1:]:
        x2, y2 = box.x, box.y + box.height / 2
        dx = (x2 - x) / 2
        parts.append(f"C{x + dx:.1f},{y:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}")
        if box is not last:
            parts.append(f"L{box.x + box.width:.1f},{y2:.1f}")
        x, y = box.x + box.width, y2
    return EdgeGeometry(first.name, last.name, " ".join(parts), label_x, label_y, "forward")


def _route(a: NodeBox, b: NodeBox, height: float) -> EdgeGeometry:
    if a.name == b.name:
        x, y = a.x + a.width, a.y + a.height / 2
        path = (
            f"M{x:.1f},{y - 10:.1f} C{x + 46:.1f},{y - 34:.1f} "
            f"{x + 46:.1f},{y + 34:.1f} {x:.1f},{y + 10:.1f}"
        )
        return EdgeGeometry(a.name, b.name, path, x + 50, y, "self")
    # Against the layering (a cycle) or within one column: loop below both boxes.
    x1, y1 = a.x + a.width / 2, a.y + a.height
    x2, y2 = b.x + b.width / 2, b.y + b.height
    low = min(max(y1, y2) + 60, height - 8)
    path = f"M{x1:.1f},{y1:.1f} C{x1:.1f},{low:.1f} {x2:.1f},{low:.1f} {x2:.1f},{y2:.1f}"
    return EdgeGeometry(
        a.name, b.name, path, (x1 + x2) / 2, (y1 + 3 * low + 3 * low + y2) / 8, "back"
    )
