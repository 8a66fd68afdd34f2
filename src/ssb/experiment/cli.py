"""`ssb experiment CONFIG.yaml [--out DIR] [--seeds 0,1,2] [--dry-run] [--results-only]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssb.config import ConfigError


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


def experiment_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ssb experiment",
        description="Run an experiment: arms x seeds x eval sets from one YAML file, sharing what is valid to "
        "share; rerun the same command to resume. See docs/experiments.md.",
    )
    p.add_argument("config", help="experiment YAML (e.g. configs/experiments/negative-context.yaml)")
    p.add_argument("--out", help="experiment directory (default: runs/experiments/<name>)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, replacing the file's `seeds` (e.g. 0,1,2)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (arms, seeds, what is shared) and exit")
    p.add_argument("--results-only", action="store_true", help="rewrite results from what has finished; run nothing")
    args = p.parse_args(argv)
    from ssb.experiment.runner import describe_plan, run_experiment
    from ssb.experiment.spec import load_spec

    try:
        spec = load_spec(args.config)
        seeds = args.seeds or spec.seeds
        out = Path(args.out) if args.out else Path("runs") / "experiments" / spec.name
        if args.dry_run:
            print(describe_plan(spec, out, seeds))
            return 0
        if args.results_only:
            from ssb.experiment.results import write_results

            write_results(spec, out, seeds)
            return 0
        print(describe_plan(spec, out, seeds), flush=True)
        run_experiment(spec, out, seeds)
    except ConfigError as e:
        print(f"ssb experiment: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"ssb experiment: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C
        from ssb.lifecycle import interrupted

        return interrupted("experiment")
    return 0
