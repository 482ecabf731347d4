"""The package's imports run one way: Triton kernels at the bottom (importing nothing else of the
package), then the options and checks, the engines, the operator, the API, the adapters, the
patch, the pipeline and trainers, the tools on top. Read from the source (every import statement,
lazy ones included), so a new upward import fails here."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "t3s_kernels"
# Lowest first; a module may import its own layer or lower ones.
LAYERS = [
    ["ops"],
    ["options", "validation", "reference", "version", "extras"],
    ["backends"],
    ["function"],
    ["api"],
    ["adapters"],
    ["patching"],
    ["pipeline", "trainer_utils", "masked_diffusion_trainer"],
    ["toy", "bench", "demo", "demo_diffusion"],
    ["cli", "__init__"],
]


def _layer(module: str) -> int:
    """The layer of a dotted module under the package ('' is the package's __init__)."""
    head = module.split(".")[0] or "__init__"
    for k, names in enumerate(LAYERS):
        if head in names:
            return k
    raise AssertionError(f"t3s_kernels.{module} is in no layer of tests/test_layering.py: place it")


def _imports(path: pathlib.Path):
    """(the module, every package module it imports), dotted relative to the package."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            found |= {".".join(target + ([a.name] if not node.module else [])) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("t3s_kernels"):
            found.add(node.module.removeprefix("t3s_kernels").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("t3s_kernels").lstrip(".") for a in node.names
                      if a.name.startswith("t3s_kernels")}
    return ".".join(parts), found


def test_imports_run_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, targets = _imports(path)
        for target in targets:
            if _layer(target) > _layer(module):
                upward.append(f"t3s_kernels.{module or '__init__'} imports t3s_kernels.{target}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))


def test_kernels_import_nothing_else_of_the_package():
    for path in sorted((PACKAGE / "ops").glob("*.py")):
        module, targets = _imports(path)
        outside = sorted(t for t in targets if not t.startswith("ops"))
        assert not outside, f"t3s_kernels.{module} imports {outside}"
