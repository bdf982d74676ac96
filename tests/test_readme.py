"""The README's set-up commands are exactly what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_commands():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    install, test = blocks[0], blocks[1]
    assert "pip install -c constraints.txt" in install
    assert "pytest" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert install in ci_lines and test in ci_lines


def test_constraints_pin_torch():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}


def test_readme_main_job_uses_a_shipped_config():
    text = (ROOT / "README.md").read_text()
    configs = re.findall(r"repblend run --config (configs/\S+\.yaml)", text)
    assert configs
    for config in configs:
        assert (ROOT / config).is_file(), config
