"""YAML as imgclf reads its config and grid files: PyYAML's safe loader, except that a key given twice in one
mapping is an error. PyYAML keeps the last one silently: ``lr: 0.1`` then ``lr: 0.5`` trained at 0.5."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice; the message says which and where."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:  # before merge keys (<<) are flattened in: overriding those is YAML's way
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise DuplicateKey(f"the key {key!r} is given twice in one mapping (line "
                                   f"{key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in a mapping (DuplicateKey, a YAMLError)."""
    return yaml.load(text, Loader=_StrictLoader)
