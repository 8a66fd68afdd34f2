"""The `ssb` command line: one verb per stage (registered in `ssb.stages.VERBS`), each a thin wrapper over the
stage's Python function.

Every stage verb takes `--config FILE.yaml`, `--preset NAME`, repeated `--set key.sub=value`, `--run-dir DIR`
and `--force`. The config is built from, in order: the defaults, a preset (`--preset`, or `preset:` inside the
`--config` file) or else the config saved in the run directory, the `--config` file, then each `--set`. With
none of `--config`, `--preset` or a saved config, the embedded quick preset applies, so `ssb run` and
`ssb run --set seed=1` differ only in the seed. The config in force is named at start.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ssb import parallel
from ssb.config import Config, ConfigError, describe, load_config, preset_names, preset_path, read_yaml, save_config
from ssb.lifecycle import before_work, interrupted, stop_subprocesses_on_sigterm
from ssb.models import ModelError
from ssb.rundir import RunDir
from ssb.stages import VERBS, load

DEFAULT_PRESET = "quick"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (may start from a shipped preset with `preset: NAME`)")
    p.add_argument(
        "--preset",
        choices=preset_names(),
        help=f"start from a shipped preset (default: {DEFAULT_PRESET}, unless --config is given or the "
        "run directory has a saved config)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set rollout.k=8 (repeatable)",
    )
    p.add_argument("--run-dir", help="run directory (default: runs/<preset or config file name>)")
    p.add_argument("--force", action="store_true", help="rerun stages even if finished with the same inputs")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssb", description="Semantic Soft Bootstrapping: RL-free self-distillation for math reasoning."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS.values():
        if verb.own_args:
            p = sub.add_parser(verb.name, help=verb.help, add_help=False)
            p.add_argument("args", nargs=argparse.REMAINDER)
            continue
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        _add_common(p)
        if verb.name == "eval":
            from ssb.stages.evaluate import add_eval_args

            add_eval_args(p)
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunDir, str]:
    """The config, the run directory, and a line naming where the config came from."""
    preset = args.preset
    run_dir = args.run_dir
    saved = RunDir(run_dir).config if run_dir else None
    if preset is None and args.config is None and not (saved and saved.exists()):
        preset = DEFAULT_PRESET
    if run_dir is None:
        run_dir = Path("runs") / (preset or Path(args.config).stem)
    run = RunDir(run_dir)
    base: dict = {}
    if preset:
        base, origin = read_yaml(preset_path(preset)), f"preset {preset!r}"
    elif args.config is None:
        base, origin = read_yaml(run.config), f"the config saved in {run.config}"
        try:  # an error in the saved config names that file
            load_config(None, (), base=base)
        except ConfigError as e:
            raise ConfigError(f"{run.config}: {e}") from None
        if base.get("trust_remote_code") is True:  # a run directory can come from anyone, like an adapter
            base = {**base, "trust_remote_code": False}
            print(
                f"ssb: note: {run.config} has trust_remote_code: true; a saved config cannot turn remote code on. "
                "If you trust the model's repository, pass --set trust_remote_code=true",
                file=sys.stderr,
            )
    else:
        origin = "defaults"
    if args.config:
        origin += f" + {args.config}"
    cfg = load_config(args.config, args.overrides, base=base)
    if args.overrides:
        origin += " + " + " ".join(f"--set {o}" for o in args.overrides)
    return cfg, run, origin


def _print_config_help() -> None:
    for key, help_, default in describe():
        print(f"{key:32s} {default!r:>12}  {help_}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # peft and TRL still call transformers' renamed gradient_checkpointing_* methods; nothing for a user to do
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated", FutureWarning)
    stop_subprocesses_on_sigterm()
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] in VERBS and VERBS[argv[0]].own_args:
        return _single_process(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        _print_config_help()
        return 0
    try:
        parallel.init()  # launched as several processes (torchrun, accelerate, SLURM): join them
        return _dispatch(args)
    except ConfigError as e:
        print(f"ssb {args.verb}: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ModelError) as e:  # bad input: files, data, models, devices; each names its place
        print(f"ssb {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C
        return interrupted(args.verb)


def _single_process(verb: str, argv: list[str]) -> int:
    """The verbs that read finished results (compare, report, verify) run on rank 0 alone when launched as several
    processes; `ssb experiment` runs its arms one process at a time."""
    try:
        w = parallel.world()
    except ValueError as e:
        print(f"ssb {verb}: error: {e}", file=sys.stderr)
        return 2
    if w.size > 1 and verb == "experiment":
        print(
            f"ssb experiment: error: launched as {w.size} processes; run `ssb experiment` in one process (its "
            "arms and seeds run one after another; launch `ssb run` per arm for multi-GPU stages)",
            file=sys.stderr,
        )
        return 2
    if not w.is_main:
        return 0
    try:
        return load(verb)(argv)
    except KeyboardInterrupt:  # a verb without its own message for it
        return interrupted(verb)


def _dispatch(args: argparse.Namespace) -> int:
    cfg, run, origin = resolve_config(args)
    if parallel.current().is_main:
        print(f"[ssb {args.verb}] config: {origin}; run directory: {run.root}", flush=True)
    if args.verb == "eval":
        return load("eval")(cfg, args)
    # config.yaml is written once the command gets past its input checks (when the first stage starts work, or at
    # the end if every stage was already done): a command that fails on bad input leaves the previous one.
    with before_work(lambda: save_config(cfg, run.config) if parallel.current().is_main else None):
        load(args.verb)(cfg, run, force=args.force)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
