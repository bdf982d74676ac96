"""`repblend` command line: one subcommand per stage, plus `run` for all of them.

Every subcommand takes `--config FILE`, `key=value` overrides and `--run-dir DIR`. User errors print
one line and exit non-zero; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from repblend.stages.errors import ConfigError, RepblendError

if TYPE_CHECKING:
    from repblend.pipeline.config import Config

log = logging.getLogger("repblend")

_STAGE_COMMANDS = {
    "run": "ingest, encode, buffer, distill, evaluate and export in one resumable job",
    "encode": "encode the train and eval splits with the frozen encoders into a feature cache",
    "buffer": "train expert trajectories on the cached features",
    "distill": "distill the synthetic set",
    "refine": "refine a feature-space set through the evaluation protocol's training (refine.enabled)",
    "invert": "turn a feature-space distilled set into images (invert.enabled)",
    "eval": "evaluate the distilled set, coresets and the full-data bound",
    "tune": "Ray Tune search over the blend parameters",
    "export": "write the distilled set as safetensors and WebDataset shards",
}


def _add_common(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required, help="YAML config file (see configs/)")
    parser.add_argument("--run-dir", help="run directory (default: runs/<run.name>)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. distill.iterations=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repblend", description="Multimodal dataset distillation (RepBlend) on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _STAGE_COMMANDS.items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text))
    validate = sub.add_parser("validate", help="check a config and print it fully resolved")
    _add_common(validate)
    convert = sub.add_parser("convert", help="write the configured dataset (all splits) as WebDataset shards")
    _add_common(convert)
    convert.add_argument("--out", required=True, help="output folder for the .tar shards")
    convert.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    report = sub.add_parser("report", help="results table and plots of a run directory")
    report.add_argument("run_dir_pos", metavar="RUN_DIR")
    report.add_argument("--debug", action="store_true")
    compare = sub.add_parser("compare", help="one results table over several run directories, with G and what "
                             "differs between their configs")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--methods", help="comma-separated rows to keep, e.g. repblend,lors (default: all)")
    compare.add_argument("--out", help="also write the table to this Markdown file")
    compare.add_argument("--over-seeds", action="store_true",
                         help="one row per experiment: runs alike but for run.seed, as mean ± std over them")
    compare.add_argument("--debug", action="store_true")
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("REPBLEND_LOG", "INFO"), format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "report":
        from repblend.pipeline.report import pixel_sources, require_run_dir, write_report

        run_dir = Path(args.run_dir_pos)
        require_run_dir(run_dir)
        print(write_report(run_dir, *pixel_sources(run_dir)))
        return 0

    if args.command == "compare":
        from repblend.pipeline.compare import compare_table
        from repblend.stages.io import write_text

        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        table = compare_table([Path(d) for d in args.run_dirs], methods, over_seeds=args.over_seeds)
        if args.out:
            write_text(args.out, table)
        print(table, end="")
        return 0

    from repblend.pipeline import steps
    from repblend.pipeline.config import load_config, to_yaml
    from repblend.pipeline.rundir import default_run_dir, prepare_run_dir, run_dir_lock

    config = load_config(args.config, args.overrides)
    if args.command == "validate":
        print(to_yaml(config), end="")
        return 0
    if args.command == "refine" and not config.refine.enabled:
        raise ConfigError(f"{args.config}: refine.enabled is false "
                          "(set refine.enabled=true, with distill.space=feature)")
    if args.command == "invert" and not config.invert.enabled:
        raise ConfigError(f"{args.config}: invert.enabled is false "
                          "(set invert.enabled=true, with distill.space=feature)")
    if args.command == "convert":
        from repblend.stages.wds import write_webdataset

        shards = write_webdataset(steps.load_table(config), args.out, shard_size=args.shard_size)
        print(f"wrote {len(shards)} shards to {args.out}")
        return 0

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    with run_dir_lock(run_dir, args.command):
        if args.command in ("distill", "refine", "invert", "eval", "export", "run"):  # before config.yaml is replaced
            steps.claim_distill_dir(config, run_dir, record=False)
            lors = steps.lors_baseline(config)
            if lors is not None:
                steps.claim_distill_dir(lors, run_dir / "lors", record=False)
        if args.command == "tune":
            steps.claim_tune_dir(config, run_dir, record=False)
        prepare_run_dir(config, run_dir, args.command)
        log.info("run directory: %s", run_dir)
        return _run(args, config, run_dir)


def _run(args: argparse.Namespace, config: Config, run_dir: Path) -> int:
    """The command's stages in RUN_DIR, which it holds."""
    from repblend.pipeline import evaluation, steps
    from repblend.pipeline.rundir import mark_stage_done

    if args.command == "tune":
        from repblend.distributed.tune import run_tune

        run_tune(config, run_dir)
        print((run_dir / "tune_results.md").read_text(), end="")
        return 0
    encode_images_with = None
    if config.ray.enabled and config.ray.data_encode:  # ray is imported only when it is used
        from repblend.distributed.encode import image_encoder_with_ray_data

        encode_images_with = image_encoder_with_ray_data(config)
    caches = steps.encode(config, encode_images_with=encode_images_with)
    mark_stage_done(run_dir, "encode", {split: str(c.tensors_path) for split, c in caches.items()})
    if args.command == "encode":
        for split, cache in caches.items():
            m = cache.manifest()
            print(f"{split}: {m['num_images']} images x {m['image_encoder']['feature_dim']}, "
                  f"{m['num_captions']} captions x {m['text_encoder']['feature_dim']} -> {cache.tensors_path}")
        return 0
    steps.check_budget(config, caches)
    # each command builds what it needs and is missing; finished work (cache, experts, checkpoints) is reused
    # the LoRS row of a RepBlend run is distilled the same way in <run>/lors, from its own (encoder) experts
    distillations = [(config, run_dir, "")]
    lors = steps.lors_baseline(config)
    if lors is not None:
        distillations.append((lors, run_dir / "lors", "lors_"))
    for sub_config, sub_dir, stage in distillations:
        if args.command in ("buffer", "distill", "refine", "invert", "export", "run"):
            buffer_dir = _buffer(sub_config, sub_dir, caches)
            mark_stage_done(run_dir, f"{stage}buffer", {"dir": str(buffer_dir)})
        if args.command in ("distill", "refine", "invert", "export", "run"):
            mark_stage_done(run_dir, f"{stage}distill", {"synthetic": str(_distill(sub_config, sub_dir, caches))})
    if args.command in ("refine", "invert", "export", "run") and config.refine.enabled:
        from repblend.pipeline.refinement import refine

        mark_stage_done(run_dir, "refine", {"synthetic": str(refine(config, run_dir, caches))})
    if args.command in ("invert", "export", "run") and config.invert.enabled:
        from repblend.pipeline.inversion import invert

        mark_stage_done(run_dir, "invert", {"synthetic": str(invert(config, run_dir, caches))})
    if args.command in ("eval", "run"):
        evaluation.evaluate(config, run_dir, caches)
        mark_stage_done(run_dir, "eval", {"results": str(run_dir / "results.json")})
    if args.command in ("export", "run"):
        mark_stage_done(run_dir, "export", {"dir": str(steps.export(config, run_dir, caches))})
    if args.command in ("eval", "run"):
        print((run_dir / "results.md").read_text(), end="")
    return 0


def _buffer(config, run_dir: Path, caches) -> Path:
    from repblend.pipeline import steps

    run_experts = None
    if config.ray.enabled:
        from repblend.distributed.buffer import expert_runner

        run_experts = expert_runner(config, steps.buffer_dir_of(config, run_dir), caches)
    return steps.buffer(config, run_dir, caches, run_experts)


def _distill(config, run_dir: Path, caches) -> Path:
    from repblend.pipeline import steps

    if config.ray.workers:
        from repblend.distributed.train import distill_with_ray

        return distill_with_ray(config, run_dir, caches)
    return steps.distill(config, run_dir, caches)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options too: `run --config c.yaml --run-dir d a=1` leaves `a=1` here
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    _setup_logging()
    try:
        return _dispatch(args)
    except RepblendError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"repblend {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine refused (permissions, a full disk, a path that is a file): one line too
        if args.debug:
            traceback.print_exc()
        print(f"repblend {args.command}: error: {exc} (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"repblend {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `repblend` command: host memory kept (pipeline/hostmem.py), then main."""
    from repblend.pipeline.hostmem import keep_freed_memory

    keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    entry()
