"""The README's layout section names every module of the package, in the layer order the
layering test enforces, and every file it names exists; its first lines give the two commands
a fresh machine runs, and those scripts exist."""

import pathlib
import re

from tests.test_layering import LAYERS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


FILE = r"[\w/-]+\.(?:py|md|sh|json|cpp)\b"


def named_paths() -> list[str]:
    """Every file or folder the layout names, as a path from the repository root, in order.
    A line at column 0 opens a top folder; a line at column 2 names an entry inside it (a file, or a
    subfolder whose files the following words name); deeper lines continue the entry above."""
    paths, top, sub = [], "", ""
    for line in _layout().splitlines():
        indent = len(line) - len(line.lstrip())
        first, rest = (line.split(maxsplit=1) + [""])[:2] if indent <= 2 else ("", line)
        if indent == 0:
            top, sub = (first, "") if first.endswith("/") else ("", "")
            paths.append(first)
        elif indent == 2:
            sub = first if first.endswith("/") else ""
            paths.append(top + first)
        if top and (sub or indent == 0 or indent > 2):
            paths += [top + sub + name for name in re.findall(FILE + r"|(?<![\w/])[a-z_][a-z0-9_]*/(?!\w)", rest)]
    return paths


def test_every_named_path_exists():
    missing = [p for p in named_paths() if not (ROOT / p).exists()]
    assert not missing, f"the README's layout names files that do not exist: {missing}"


def test_every_package_module_is_named():
    named = set(named_paths())
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "t3s_kernels").rglob("*.py"))
               if p.name != "__init__.py"]
    unnamed = [m for m in modules if m not in named]
    assert not unnamed, f"the README's layout does not name: {unnamed}"


def test_package_entries_follow_the_layers():
    order = []
    for p in named_paths():
        entry = p.removeprefix("t3s_kernels/").rstrip("/")
        if p.startswith("t3s_kernels/") and entry and "/" not in entry:
            order.append(entry.removesuffix(".py"))
    layer = {name: k for k, names in enumerate(LAYERS) for name in names}
    ranks = [layer[name] for name in order]
    assert ranks == sorted(ranks), f"the layout's package entries are not lowest layer first: {order}"
    assert set(order) == set(layer) - {"__init__"}, set(layer) ^ set(order)


def test_first_lines_give_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    for script in ("scripts/bench.sh", "scripts/test.sh"):
        assert f"bash {script}" in head and (ROOT / script).exists(), script
