"""The layout's rules: the core never imports the lab, except bench.py the adapter baselines it measures,
and the helpers module imports nothing of the model."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["model", "lora", "train", "sample", "prepare_data", "bench", "utils"]


def imported_modules(name: str) -> set[str]:
    """Every module a file imports, anywhere in it (a late import inside a function too); `from lab
    import x` counts as lab.x."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "lab":
            found |= {f"lab.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_core_imports_of_the_lab_only_the_adapter_baselines_bench_measures():
    lab = {name: {m for m in imported_modules(name) if m.split(".")[0] == "lab"} for name in CORE}
    assert lab == {name: {"lab.adapter_baselines"} if name == "bench" else set() for name in CORE}


def test_utils_imports_nothing_of_the_project():
    assert imported_modules("utils") & {*CORE, "lab"} == set()
