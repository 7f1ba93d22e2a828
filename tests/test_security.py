"""Security by inspection of the source: every torch.load is weights_only=True, YAML is read
with safe_load, and nothing calls eval/exec. (The crafted-checkpoint test that proves a
pickle payload does not run is in test_training.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mrpf"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                dotted = (f"{func.value.id}.{func.attr}" if isinstance(func, ast.Attribute)
                          and isinstance(func.value, ast.Name) else getattr(func, "id", None))
                if dotted == name:
                    yield path, node


def test_the_scan_sees_the_package():
    assert len(SOURCES) > 10 and list(calls("torch.load")), "the scan found no torch.load: is it looking at mrpf/?"


def test_every_torch_load_is_weights_only():
    for path, node in calls("torch.load"):
        keywords = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in keywords and getattr(keywords["weights_only"], "value", None) is True, \
            f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_yaml_is_only_safe_loaded_and_nothing_is_evaluated():
    for name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec", "pickle.load", "pickle.loads"):
        found = [f"{p.name}:{n.lineno}" for p, n in calls(name)]
        assert not found, f"{name} called at {found}"
