"""YAML read within fixed bounds: nesting depth, node count, alias expansion, and no duplicate keys.

yaml.safe_load has no limits of its own: 10,000 nested brackets end in a RecursionError, a few aliases
expand to billions of values (Python shares the objects, but whatever walks them does not), a 1 MB list
of small scalars costs hundreds of MB of nodes, and a repeated key silently keeps the last value. This
loader composes the document under a depth and node budget, measures what aliases expand to before
anything is constructed, and refuses repeated keys. Callers bound the text's size before it gets here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import CollectionNode, MappingNode, Node, ScalarNode

MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Bounds:
    """The most a document may hold: nesting depth (aliases included), nodes, nodes after expansion."""

    depth: int = 32
    nodes: int = 10_000
    expanded: int = 50_000


def safe_load(text: str, bounds: Bounds | None = None) -> Any:
    """yaml.safe_load(text) within `bounds`; a violation raises yaml.MarkedYAMLError with its position."""
    loader = BoundedLoader(text, bounds or Bounds())
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts while composing and checks the composed graph before constructing it."""

    def __init__(self, text: str, bounds: Bounds) -> None:
        super().__init__(text)
        self.bounds = bounds
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        self.nodes += 1
        if self.nodes > self.bounds.nodes:
            raise ComposerError(None, None, f"more than {self.bounds.nodes:,} values", mark)
        if self.depth >= self.bounds.depth:
            raise ComposerError(None, None, f"nested deeper than {self.bounds.depth} levels", mark)
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node: MappingNode = super().compose_mapping_node(anchor)
        first: dict[tuple[str, Any], Node] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
                continue
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                raise ComposerError(
                    None,
                    None,
                    f"duplicate key {_show(key.value)} (first on line {seen.start_mark.line + 1}); "
                    "YAML would silently keep only the last one",
                    key.start_mark,
                )
        return node

    def get_single_node(self) -> Node | None:
        root: Node | None = super().get_single_node()
        if root is not None:
            check_expansion(root, self.bounds)
        return root


def check_expansion(root: Node, bounds: Bounds) -> None:
    """Nodes and depth as a consumer sees them (aliases expanded), computed without expanding anything."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()  # the nodes being expanded: meeting one again is a recursive alias
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            on_path.discard(key)
            if size[key] > bounds.expanded:
                raise ComposerError(
                    None, None, f"aliases expand to more than {bounds.expanded:,} values", node.start_mark
                )
            if depth[key] > bounds.depth:
                raise ComposerError(
                    None, None, f"aliases nest deeper than {bounds.depth} levels", node.start_mark
                )
        elif key not in size:
            if key in on_path:
                raise ComposerError(
                    None, None, "an alias refers to the value that contains it", node.start_mark
                )
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in size)


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, CollectionNode):
        return list(node.value)
    return []


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
