"""The prepared GPU check (benchmarks/gpu_check.sh) fits its 8 minutes, names files that exist and
passes `t3s bench` arguments it accepts: a lent GPU is scarce, so the script must not fail there
on a moved test file or a renamed flag. The transformers 4.x run (scripts/test_transformers4.sh)
names tests that exist, is run by CI, and installs the very floor pyproject.toml declares."""

import pathlib
import re
import shlex

from t3s_kernels.bench import PROVIDERS
from t3s_kernels.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
COMMANDS = [c for c in re.sub(r"\\\n\s*", " ", SCRIPT).splitlines() if c.startswith("timeout ")]


def test_budget_is_at_most_eight_minutes():
    assert COMMANDS, "no timed commands found"
    assert sum(int(c.split()[1]) for c in COMMANDS) <= 8 * 60


def test_named_files_exist():
    for path in re.findall(r"\b(?:tests|benchmarks)/[\w/.-]+", SCRIPT):
        assert (ROOT / path.rstrip(".")).exists(), path


def test_bench_arguments_parse():
    parser = build_parser()
    bench = [c for c in COMMANDS if "t3s_kernels.cli bench" in c]
    assert len(bench) >= 3
    for command in bench:
        words = shlex.split(command.split("2>&1")[0])
        args = parser.parse_args(words[words.index("t3s_kernels.cli") + 1:])
        assert args.command == "bench", command
        assert set(args.providers or []) <= set(PROVIDERS), command


def test_transformers4_run_names_its_tests_runs_in_ci_and_tests_the_declared_floor():
    import tomllib

    script = (ROOT / "scripts" / "test_transformers4.sh").read_text()
    paths = re.findall(r"\btests/[\w/.-]+", script)
    assert len(paths) >= 7, paths
    for path in paths:
        assert (ROOT / path).exists(), path
    assert "bash scripts/test_transformers4.sh" in (ROOT / ".ci" / "run").read_text()
    pins = dict(line.split("==") for line in (ROOT / "requirements-transformers4.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("hf", "test"):
        declared = [d for d in extras[extra] if d.startswith("transformers")]
        assert declared == [f"transformers>={pins['transformers'].rsplit('.', 1)[0]}"], (extra, declared)
