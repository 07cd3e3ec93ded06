"""The package's floors (BUILD.md, "Layout"): a module imports only from lower floors
(or its own floor, without cycles). A new module must be given a floor here."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_dst"

FLOORS = {
    # 1. checks, the registry type, score inputs, Keras internals, warnings
    "validation": 1, "registry": 1, "scoring": 1, "compat": 1, "user_warnings": 1,
    # 2. pure selection, distributions, schedules (and the update rule), optimizer state
    "topology": 2, "distributions": 2, "schedules": 2, "optimizer_state": 2,
    # 3. patterns (units of selection), criteria and growth (scores + dispatch)
    "patterns": 3, "criteria": 3, "growth": 3,
    # 4. Keras objects: the wrapper, masks, the reference optimizer
    "layers": 4, "masks": 4, "optimizers": 4,
    # 5. the update on device, the hook protocol, step switching
    "engine": 5, "hooks": 5, "step_switch": 5,
    # 6. callbacks and conversions, saving, test helpers, export
    "callbacks": 6, "gradual": 6, "overlap": 6, "convert": 6, "saving": 6, "testing": 6,
    "export": 6,
    "__init__": 7,
}


def imported_modules(path):
    """keras_dst modules imported by the file at `path`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_dst"):
            if node.module == "keras_dst":
                names.update(alias.name for alias in node.names)
            else:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("keras_dst."))
    return names


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_floor():
    assert sorted(set(MODULES) - set(FLOORS)) == []


@pytest.mark.parametrize("module", MODULES)
def test_a_module_imports_only_lower_floors(module):
    higher = {m: FLOORS[m] for m in imported_modules(PACKAGE / f"{module}.py")
              if FLOORS.get(m, 0) > FLOORS[module]}
    assert not higher, f"{module} (floor {FLOORS[module]}) imports higher floors {higher}"


@pytest.mark.parametrize("module", MODULES)
def test_a_floor_a_module_s_docstring_names_is_its_floor(module):
    docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text())) or ""
    named = {int(a or b) for a, b in re.findall(r"\(floor (\d)[):]|^Floor (\d) \(", docstring,
                                                re.MULTILINE)}
    assert named <= {FLOORS[module]}, f"{module}'s docstring names floor {named}"


def test_no_import_cycles_within_a_floor():
    graph = {m: imported_modules(PACKAGE / f"{m}.py") & set(MODULES) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "active", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "active"
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])
