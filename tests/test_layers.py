"""The package's layering: no import cycles, packages by concept that import downward, a
photo path that loads no model code, --model resolved in one module, and an inference
path that loads no training-only library."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import faceattrs

PACKAGE = Path(faceattrs.__file__).parent


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> faceattrs modules it imports`` (at any depth: top level or in functions).

    ``from .x import y`` counts as an import of ``x.y`` when that is a module, else of ``x``.
    """
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level == 0:
                    base = node.module or ""
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            graph[mod] |= {t for t in targets if t in modules and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert "faceattrs.bundle" in graph["faceattrs.predict"] | graph["faceattrs.backends"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The modules of a package by concept, lowest first: a module imports only those before it
PACKAGE_LAYERS = {
    "faceattrs.photo": ["decode", "config", "detect", "align", "faces", "worker"],
    "faceattrs.serve": ["limits", "uploads", "worker", "info", "app", "server"],
    "faceattrs.report": ["discover", "markup", "documents", "render"],
    "faceattrs.distributed": ["sources", "workers", "output"],
}
# What the photo package may import from the rest of faceattrs: its worker processes
# (spawned) import it alone, so it stays off the model code (torch); faceattrs.config is the
# settings checks (standard library only)
PHOTO_NEEDS = {"faceattrs.config", "faceattrs.exceptions", "faceattrs.inputs", "faceattrs.lifeline"}


def test_packages_by_concept_import_downward():
    graph = import_graph()
    for package, order in PACKAGE_LAYERS.items():
        modules = {m.rpartition(".")[2] for m in graph if m.startswith(package + ".")}
        assert modules == set(order), f"{package}: {sorted(modules)} vs PACKAGE_LAYERS"
        for i, name in enumerate(order):
            deps = {d for d in graph[f"{package}.{name}"] if d.startswith(package)}
            allowed = {f"{package}.{m}" for m in order[:i]}
            assert deps <= allowed, f"{package}.{name} imports {sorted(deps - allowed)}"


def test_photo_package_imports_no_model_code():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod == "faceattrs.photo" or mod.startswith("faceattrs.photo."):
            outside = {d for d in deps if not d.startswith("faceattrs.photo")}
            assert outside <= PHOTO_NEEDS, f"{mod} imports {sorted(outside - PHOTO_NEEDS)}"


def test_a_photo_worker_loads_no_torch():
    """A photo worker process's start and work (what a spawned worker imports and runs)."""
    code = """
import sys
import numpy as np
from faceattrs.photo.faces import prepare
from faceattrs.photo.worker import worker_start
worker_start(None)
item = prepare(0, np.full((60, 60, 3), 90, np.uint8), detect=False)
assert item.faces and item.faces[0].crop.shape == (48, 48)
heavy = sorted(m for m in ("torch", "fastapi", "matplotlib", "sklearn") if m in sys.modules)
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stages_do_not_import_the_cli():
    graph = import_graph()
    for mod, deps in graph.items():
        if not mod.startswith("faceattrs.cli") and mod != "faceattrs.__main__":
            assert not any(d.startswith("faceattrs.cli") for d in deps), mod


# inside faceattrs.training, imports point to a lower rank only: the loop the age stage
# shares knows nothing of the multitask settings, and only `run` puts everything together
TRAINING_LAYERS = {"ddp": 0, "loop": 1, "config": 1, "losses": 2, "weights": 2, "state": 2,
                   "run": 3}  # fmt: skip
# the modules outside the package that train (the CLI command, the all-stages pipeline and
# the age stage); nothing below them (models, bundles, inference, evaluation) imports it
TRAINING_USERS = {"faceattrs.cli.train", "faceattrs.pipeline", "faceattrs.age.finetune",
                  "faceattrs.age.pipeline"}  # fmt: skip


def test_training_package_layers():
    graph = import_graph()
    modules = {m for m in graph if m.startswith("faceattrs.training.")}
    assert {m.rsplit(".", 1)[1] for m in modules} == set(TRAINING_LAYERS), modules
    for mod in modules:
        for dep in graph[mod]:
            if dep.startswith("faceattrs.training."):
                a, b = (TRAINING_LAYERS[m.rsplit(".", 1)[1]] for m in (mod, dep))
                assert a > b, f"{mod} imports {dep}: same or higher layer"
    users = {m for m, deps in graph.items() if not m.startswith("faceattrs.training")
             and any(d.startswith("faceattrs.training") for d in deps)}  # fmt: skip
    assert users == TRAINING_USERS, users


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_reachable_follows_imports_through_modules():
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


# inference: the analyzer, its backends and settings, the predict command and the server
INFERENCE = ("faceattrs.predict", "faceattrs.backends", "faceattrs.settings",
             "faceattrs.predict_files", "faceattrs.serve.app")  # fmt: skip


def test_inference_does_not_import_the_export_stage():
    """The onnx backend opens exports itself (``backends.open_onnx``, a run folder's graphs
    written by ``onnx_graphs``); ``faceattrs export`` (int8, the agreement check) is a stage
    above it."""
    graph = import_graph()
    for mod in INFERENCE:
        assert "faceattrs.export" not in reachable(graph, mod), mod
    assert "faceattrs.backends" in reachable(graph, "faceattrs.export")


# faceattrs.age in two layers: the model (what a bundle loads) and the stage above it
AGE_MODEL = {"bins", "direct", "conformal", "regress", "networks"}
AGE_STAGE = {"config", "finetune", "evaluate", "pipeline"}


def test_age_model_layer_imports_nothing_above_it():
    """The age model layer imports no age stage module, no training code and no module
    that imports the age package back (faceattrs.bundle: it loads the age model); only
    the stage layer and the modules above it import the age stage."""
    graph = import_graph()
    age = {m.rpartition(".")[2] for m in graph if m.startswith("faceattrs.age.")}
    assert age == AGE_MODEL | AGE_STAGE, sorted(age)
    stage = {f"faceattrs.age.{m}" for m in AGE_STAGE}
    for name in AGE_MODEL:
        deps = graph[f"faceattrs.age.{name}"]
        up = {d for d in deps if d in stage or d.startswith("faceattrs.training")
              or d == "faceattrs.bundle"}  # fmt: skip
        assert not up, f"faceattrs.age.{name} imports {sorted(up)}"
    for mod in ("faceattrs.bundle", "faceattrs.backends", "faceattrs.predict",
                "faceattrs.onnx_graphs"):  # fmt: skip
        assert not reachable(graph, mod) & stage, mod


def test_model_folders_are_read_in_one_module():
    """Only the bundle layer (bundle, and run_folder for the calibration file) knows the
    names of a model folder's files."""
    markers = ('"age.json"', '"calibration.json"', '"faceattrs-onnx.json"', "multitask_absolute")
    readers = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if any(m in text for m in markers):
            readers.add(module_name(path))
    # age.networks writes age.json (train-age); bundle reads every kind, run_folder its
    # calibration.json; the report package renders every file of a run folder as a document
    # (it loads no model)
    report = {m for m in readers if m == "faceattrs.report" or m.startswith("faceattrs.report.")}
    allowed = {"faceattrs.bundle", "faceattrs.run_folder", "faceattrs.age.networks"}
    assert readers - report <= allowed and "faceattrs.bundle" in readers, readers


def test_inference_imports_no_training_library(run_dir):
    """Loading a bundle (conftest's session bundle, only read) and analysing a face imports
    no training library (kornia, matplotlib, scikit-learn, SciPy) and no training code
    (faceattrs.training)."""
    code = f"""
import sys
import numpy as np
import faceattrs
from faceattrs import predict_files  # the `predict` command's module
an = faceattrs.FaceAnalyzer({str(run_dir)!r})
rec = an.analyze(np.full((48, 48), 128, np.uint8), detect=False)[0]
assert rec["age"] is not None and rec["gender"]["label"]
heavy = sorted(m for m in ("kornia", "matplotlib", "sklearn", "scipy") if m in sys.modules)
assert not heavy, heavy
training = sorted(m for m in sys.modules if m.startswith("faceattrs.training"))
assert not training, training
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_stays_light():
    code = """
import sys
from faceattrs.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "kornia", "matplotlib", "cv2", "PIL", "sklearn", "scipy")
               if m in sys.modules)
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
