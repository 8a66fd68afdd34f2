"""The `ssb` command line: one verb per stage, each a thin wrapper over the stage's Python function.

Every stage verb takes `--config FILE.yaml`, repeated `--set key.sub=value`, `--run-dir DIR` and `--force`.
Without `--config`, a stage reuses the config saved in the run directory (so `ssb curate --run-dir D` continues
what `ssb rollout --run-dir D` started); `ssb run` with no arguments runs the embedded quick preset.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ssb.config import Config, ConfigError, describe, load_config, preset_path, save_config
from ssb.rundir import RunDir

STAGES = ("rollout", "curate", "teach", "logits", "train")
DEFAULT_PRESET = "quick"

HELP = {
    "rollout": "sample K answers per training question and verify them",
    "curate": "keep mixed questions; build hinted teacher prompts",
    "teach": "teacher writes a verified solution from the hinted prompt",
    "logits": "store the teacher's sparse distribution over each solution",
    "train": "distil into a LoRA student (KL at temperature T)",
    "eval": "pass@1 / pass@k / maj@k of a model on a benchmark",
    "report": "HTML + markdown report of one or more runs",
    "verify": "check answers against gold answers",
    "run": "all stages in order, then base vs student evaluation",
    "compare": "table of eval summaries with paired significance tests",
    "grpo": "GRPO baseline (TRL) on the same questions and reward",
}


def _add_common(p: argparse.ArgumentParser, run_dir_required: bool = False) -> None:
    p.add_argument("--config", help="YAML config file (may start from a shipped preset with `preset: NAME`)")
    p.add_argument("--preset", help="start from a shipped preset (quick, full, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rollout.k=8 (repeatable)")
    p.add_argument("--run-dir", required=run_dir_required, help="run directory (default: runs/<preset>)")
    p.add_argument("--force", action="store_true", help="rerun stages even if finished with the same inputs")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssb", description="Semantic Soft Bootstrapping: RL-free self-distillation for math reasoning.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in STAGES + ("run", "grpo"):
        _add_common(sub.add_parser(verb, help=HELP[verb], description=HELP[verb]))
    p = sub.add_parser("eval", help=HELP["eval"], description=HELP["eval"])
    _add_common(p)
    try:
        from ssb.stages.evaluate import add_eval_args
    except ImportError:
        pass
    else:
        add_eval_args(p)
    p = sub.add_parser("report", help=HELP["report"], description=HELP["report"])
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--output", help="output directory (default: the first run's report/)")
    p = sub.add_parser("verify", help=HELP["verify"], add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("compare", help=HELP["compare"], add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunDir]:
    """Config from (in order) defaults, preset, the run dir's saved config, --config, --set; and the run dir."""
    preset = args.preset
    if preset is None and args.config is None and args.run_dir is None:
        preset = DEFAULT_PRESET
    run = RunDir(args.run_dir or Path("runs") / (preset or Path(args.config).stem))
    base: dict = {}
    if preset:
        from ssb.config import read_yaml

        base = read_yaml(preset_path(preset))
    elif args.config is None and run.config.exists():
        from ssb.config import read_yaml

        base = read_yaml(run.config)
    cfg = load_config(args.config, args.overrides, base=base)
    return cfg, run


def _print_config_help() -> None:
    for key, help_, default in describe():
        print(f"{key:32s} {default!r:>12}  {help_}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # peft and TRL still call transformers' renamed gradient_checkpointing_* methods; nothing for a user to do
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated", FutureWarning)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] == "verify":
        from ssb.verify import verify_main

        return verify_main(argv[1:])
    if argv[0] == "compare":
        from ssb.stages.evaluate import compare_main

        return compare_main(argv[1:])
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        _print_config_help()
        return 0
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"ssb {args.verb}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"ssb {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nssb {args.verb}: interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "report":
        from ssb.stages.report import report

        report([Path(d) for d in args.run_dirs], output=Path(args.output) if args.output else None)
        return 0
    cfg, run = resolve_config(args)
    if args.verb == "eval":
        from ssb.stages.evaluate import eval_from_args

        return eval_from_args(cfg, args)
    run.mkdir()
    save_config(cfg, run.config)
    if args.verb == "run":
        from ssb.pipeline import run_all

        run_all(cfg, run, force=args.force)
        return 0
    if args.verb == "grpo":
        from ssb.stages.grpo import grpo

        grpo(cfg, run, force=args.force)
        return 0
    stage_fn = load_stage(args.verb)
    stage_fn(cfg, run, force=args.force)
    return 0


def load_stage(name: str):
    """The stage function for a verb (imported lazily: `ssb --help` stays fast)."""
    import importlib

    module = importlib.import_module(f"ssb.stages.{name}")
    return getattr(module, name)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
