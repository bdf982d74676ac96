"""Architecture rules: stages/ is pure PyTorch, and the install exposes only the repblend namespace."""

import ast
import subprocess
import sys
import zipfile
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_stages_never_import_ray():
    offenders = [p.name for p in (ROOT / "stages").glob("*.py") if "ray" in _imports(p)]
    assert not offenders, f"stages/ must not import ray: {offenders}"


def test_installed_distribution_declares_only_repblend():
    """`distributed` is Dask's import name and `pipeline`/`stages` exist on PyPI: we install only `repblend.*`."""
    dist = importlib.metadata.distribution("repblend")
    assert dist.read_text("top_level.txt").split() == ["repblend"]


def test_wheel_contains_only_the_repblend_namespace(tmp_path):
    """Build the real wheel (what `pip install .` installs) and inspect its file list."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("repblend-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"repblend"}, top
    for package in ("pipeline", "stages", "distributed"):
        assert f"repblend/{package}/__init__.py" in names


def test_import_from_elsewhere(tmp_path):
    """Outside the checkout, only repblend.* resolves to this project; bare names do not."""
    code = (
        "import importlib.util, sys\n"
        "import repblend.stages, repblend.pipeline, repblend.distributed\n"
        "for name in ('pipeline', 'stages', 'distributed'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        name, origin = line.split(" ", 1)
        assert origin == "None" or str(ROOT) not in origin, f"top-level '{name}' resolves to {origin}"
