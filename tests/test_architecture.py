"""The package's layers: no module imports one above it (docs/architecture.md draws them).

Every module of ``src/qualiclip`` has a layer here; an import, at module level or inside a
function, may only reach a strictly lower layer. So the import graph has no cycles, the model
never reaches up into the engine, and the front ends stay on top. A new module must be given
its layer here and in docs/architecture.md, whose drawing and table of modules are checked
against this one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qualiclip"
ARCHITECTURE_DOC = PACKAGE.parents[1] / "docs" / "architecture.md"

LAYERS: dict[str, int] = {
    # 0 - leaves: import nothing of qualiclip's
    "prompts": 0, "precision": 0, "heap": 0, "images": 0, "inputs": 0, "clip": 0, "losses": 0,
    "metrics": 0, "uploads": 0, "_codec": 0, "weight_files": 0, "color": 0,
    "train_choices": 0,  # torch-free, so the command line offers them without loading torch
    "output_files": 0, "stopping": 0,  # how outputs are written and how runs stop: torch-free
    # 1 - building blocks on the leaves
    "pretrained": 1, "fused": 1, "datasets": 1, "crops": 1, "niqe": 1, "degradations": 1,
    "onnx_scorer": 1,  # ONNX Runtime scorer: the model factory returns it for .onnx files
    "prompt_learning": 1,  # learned prompt context and pyiqa's prompt files (QualiCLIP+)
    "reading": 1,  # files to decoded pixels in threads (and JPEGs on the GPU), for the engine
    # 2 - on those
    "sheet": 2, "tokenizer": 2,
    "quantize": 2,  # the int8 tower: takes the model as a protocol, below the engine that runs it
    # 3 - the model and its factory
    "model": 3,
    # 4 - the engine (files and tensors in, scores out), and the ONNX export beside it
    "engine": 4, "onnx_export": 4,
    # 5 - libraries of the front ends
    "output": 5, "evaluate": 5, "train_config": 5, "batcher": 5, "maps": 5,
    "quality_loss": 5, "quality_metric": 5,  # QualiCLIP in others' code: loss, metric
    # 6, 7 - training
    "checkpoints": 6, "validation": 6, "train": 7, "tune": 7,
    "report": 6,  # the HTML report: draws maps (layer 5) beside thumbnails
    # 8, 9 - front ends
    "serve": 8, "ray_scoring": 8, "cli": 9,
    "__init__": 10,  # lazy re-exports of the public API
}


def _imports(path: Path) -> set[str]:
    """qualiclip modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "qualiclip":
                found.update(a.name for a in node.names if a.name != "__version__")
            elif node.module.startswith("qualiclip."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("qualiclip."))
    return found


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [m for m in _modules() if m not in LAYERS]
    assert not missing, f"give these modules a layer in tests/test_architecture.py: {missing}"
    stale = [m for m in LAYERS if m not in _modules()]
    assert not stale, f"layers of modules that no longer exist: {stale}"


@pytest.mark.parametrize("module", _modules())
def test_imports_only_reach_lower_layers(module: str) -> None:
    wrong = sorted(
        f"{module} (layer {LAYERS.get(module)}) imports {dep} (layer {LAYERS.get(dep)})"
        for dep in _imports(PACKAGE / f"{module}.py")
        if dep in LAYERS and module in LAYERS and LAYERS[dep] >= LAYERS[module]
    )
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a lazy import inside a function is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from qualiclip.engine import score\n"
                      "    import qualiclip.cli\n")
    assert _imports(source) == {"engine", "cli"}


def _documented_layers(text: str) -> dict[str, int]:
    """Module -> layer as docs/architecture.md draws them: the first code block, one line per
    layer (number, names two spaces apart, then a wider gap before any description), a line
    without a number continuing the layer above it."""
    block = text.split("```", 2)[1]
    layers: dict[str, int] = {}
    layer = None
    for line in block.splitlines()[3:]:  # after the opening fence, the heading and its rule
        head = re.match(r"\s*(\d+)\s", line)
        if head:
            layer = int(head.group(1))
            line = line[head.end():]
        names_part = re.split(r"\s{3,}", line.strip())[0]
        for name in names_part.split():
            assert layer is not None, f"module {name} drawn before any layer number"
            layers[name] = layer
    return layers


def test_architecture_doc_draws_every_module_in_its_layer() -> None:
    text = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    drawn = _documented_layers(text)
    missing = [m for m in _modules() if m not in drawn]
    assert not missing, f"docs/architecture.md does not draw these modules: {missing}"
    moved = {m: (drawn[m], LAYERS[m]) for m in _modules() if m in drawn and drawn[m] != LAYERS[m]}
    assert not moved, f"docs/architecture.md draws these in other layers (doc, test): {moved}"
    stale = [m for m in drawn if m not in _modules()]
    assert not stale, f"docs/architecture.md draws modules that no longer exist: {stale}"


def test_architecture_doc_has_a_line_for_every_module() -> None:
    rows = set(re.findall(r"^\| `(\w+)` \|", ARCHITECTURE_DOC.read_text(encoding="utf-8"), re.M))
    missing = [m for m in _modules() if m not in rows]
    assert not missing, f"add these modules to docs/architecture.md's table of modules: {missing}"


def test_the_doc_check_reads_the_drawing() -> None:
    """The parser itself: numbered lines, continuation lines, descriptions ignored."""
    text = ("intro\n```\n layer  modules\n ─────  ───\n"
            "   2    b  c" + " " * 42 + "what b does\n        d\n   0    a\n```\n")
    assert _documented_layers(text) == {"b": 2, "c": 2, "d": 2, "a": 0}
