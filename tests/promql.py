"""The metric names a PromQL query reads, and the ones the service defines: for the alert rules' and the Grafana
dashboard's tests, so that a renamed metric fails a test instead of leaving a rule or a panel silently empty."""

from __future__ import annotations

import re

from tests.conftest import REPO

SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
# PromQL's words that read like names: binary operators, and the modifiers whose lists hold label names
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_STRINGS = re.compile(r'"[^"]*"|\'[^\']*\'|`[^`]*`')
_MATCHERS_AND_RANGES = re.compile(r"\{[^}]*\}|\[[^]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# a name not after a letter, digit, dot or $ (1e-3, 0.99, Grafana's $__range); one before ( is a function
_NAME = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(query: str) -> set[str]:
    """The metrics `query` selects: neither functions, aggregations, keywords nor label names."""
    text = _LABEL_LISTS.sub(" ", _MATCHERS_AND_RANGES.sub(" ", _STRINGS.sub(" ", query)))
    return {m.group(1) for m in _NAME.finditer(text) if not m.group(2) and m.group(1) not in KEYWORDS}


def family(name: str) -> str:
    """A sample's metric family: mnist_x_bucket -> mnist_x (a counter's family keeps no _total)."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def service_metric_names() -> set[str]:
    """Every metric family named in service/ (each metric is created with its name as a string literal)."""
    names = set()
    for path in (REPO / "service").rglob("*.py"):
        names.update(re.findall(r"[\"'](mnist_[a-z0-9_]+)[\"']", path.read_text()))
    return {family(name) for name in names}
