"""`repblend compare RUN_DIR...`: one table over several runs (budgets, settings, seeds) from their results.json.

A study is several runs (100, 200 and 500 pairs; a sweep; pixel against feature space); each run's results.md has
its own table, and comparing them meant copying numbers by hand. This reads only the run directories, so it works
on copies of runs made elsewhere, and names the settings in which the runs' configs differ.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import yaml

from repblend.pipeline.config import flat_keys
from repblend.pipeline.evaluation import GAP_METRICS, gap_closed, share_cell
from repblend.stages.errors import DataError
from repblend.stages.io import read_json

# keys that differ between runs without changing what a run measures: where its files go, how it logs
_NOT_SETTINGS = ("data.root", "run.name", "run.progress", "run.progress_every", "run.tensorboard")


# settings whose value is a mapping of the user's names (one value to compare, not sections)
_MAPPINGS = ("eval.sets",)
_ABSENT = "-"  # a key one run's config does not have (a run made before it existed)


def _flat(config: dict) -> dict[str, object]:
    return flat_keys(config, leaves=_MAPPINGS)


def _is_setting(key: str, ignore: tuple[str, ...] = ()) -> bool:
    """A key that changes what a run measures (not where its files go or how it logs), and not one of `ignore`."""
    return key not in _NOT_SETTINGS and key not in ignore and not key.endswith(".dir")


def _differences(configs: list[dict], ignore: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """Per run, the settings whose values are not the same in every run (paths and logging left out)."""
    flats = [_flat(c) for c in configs]
    keys = sorted({k for flat in flats for k in flat})
    differing = [k for k in keys if _is_setting(k, ignore) and len({repr(flat.get(k, _ABSENT)) for flat in flats}) > 1]
    return [{k: flat.get(k, _ABSENT) for k in differing} for flat in flats]


def load_run(run_dir: Path) -> tuple[dict, dict]:
    """A run's results.json and resolved config.yaml; a folder without results is named in one line."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise DataError(f"{run_dir}: no results.json (not a run directory, or not evaluated yet: `repblend eval`)")
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return read_json(results_path), config or {}


def _settings_but_seed(config: dict) -> str:
    """A run's settings without its seed (and without paths and logging): runs alike in this are one experiment's
    repeats."""
    flat = {k: v for k, v in _flat(config).items() if _is_setting(k, ignore=("run.seed",))}
    return repr(sorted(flat.items()))


def _over_seeds(runs: list[tuple[Path, dict, dict]]) -> list[tuple[str, dict, dict]]:
    """Runs grouped by their settings but the seed: per group, its label, each method's mean ± std over the runs'
    means (methods every run of the group has), and the first run's config."""
    groups: dict[str, list[tuple[Path, dict, dict]]] = {}
    for run in runs:
        groups.setdefault(_settings_but_seed(run[2]), []).append(run)
    out = []
    for members in groups.values():
        names = [name for name in members[0][1]["methods"] if all(name in r[1]["methods"] for r in members)]
        methods = {}
        for name in names:
            methods[name] = {}
            for key in GAP_METRICS:
                values = [r[1]["methods"][name][key]["mean"] for r in members]
                methods[name][key] = {"mean": statistics.fmean(values),  # no spread from one run
                                      "std": statistics.stdev(values) if len(values) > 1 else None}
        seeds = ", ".join(str(r[2].get("run", {}).get("seed", "?")) for r in members)
        label = str(members[0][0]) + (f" (+{len(members) - 1}; seeds {seeds})" if len(members) > 1 else "")
        out.append((label, {"methods": methods, "pairs": members[0][1]["pairs"], "runs": len(members)},
                    members[0][2]))
    return out


def compare_table(run_dirs: list[Path], methods: list[str] | None = None, over_seeds: bool = False) -> str:
    """Markdown: a row per run and method (IR@10, TR@10, r_mean as mean ± std, and G), then what differs."""
    runs = [(run_dir, *load_run(run_dir)) for run_dir in run_dirs]
    lines = []
    if over_seeds:  # one row per experiment: the mean ± std over its seeds' runs of each run's mean
        runs = _over_seeds(runs)
        lines = ["Runs alike but for run.seed are one experiment: mean ± std over its runs (each run's mean over its "
                 "evaluation seeds); G of those means.", ""]
    differences = _differences([config for _, _, config in runs], ignore=("run.seed",) if over_seeds else ())
    header = ["runs" if over_seeds else "run", "pairs", "method", "IR@10", "TR@10", "r_mean",
              *(f"G {key}" for key in GAP_METRICS)]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for run_dir, results, _ in runs:
        shares = results.get("gap_closed") or gap_closed(results["methods"])  # runs evaluated before G was kept
        for name, metrics in results["methods"].items():
            if methods and name not in methods:
                continue
            cells = [f"{metrics[k]['mean']:.1f}" + ("" if metrics[k]["std"] is None else f" ± {metrics[k]['std']:.1f}")
                     for k in GAP_METRICS]
            gaps = [share_cell(shares.get(name, {}).get(k)) for k in GAP_METRICS]
            lines.append(f"| {run_dir} | {results['pairs']} | {name} | " + " | ".join(cells + gaps) + " |")
    if any(differences):
        lines += ["", f"Settings that differ between the {'experiments' if over_seeds else 'runs'}:", ""]
        lines += [f"- {run_dir}: " + ", ".join(f"{k}={v}" for k, v in diff.items())
                  for (run_dir, _, _), diff in zip(runs, differences)]
    elif len(runs) > 1:
        lines += ["", "The runs' configs are the same (paths and logging aside)."]
    elif over_seeds and len(run_dirs) > 1:
        lines += ["", f"All {len(run_dirs)} runs are one experiment (their configs differ only in run.seed)."]
    return "\n".join(lines) + "\n"
