"""`ssb run`: every stage in order on one config, then the base model and the student on held-out questions.

Each stage skips itself when already finished with the same config and inputs, so rerunning `ssb run` after a
crash or a kill continues where it stopped.
"""

from __future__ import annotations

import importlib.util
import time

from ssb.config import Config
from ssb.rundir import RunDir

PIPELINE = ("rollout", "curate", "teach", "logits", "train")


def missing_stages() -> list[str]:
    names = list(PIPELINE) + ["evaluate"]
    return [n for n in names if importlib.util.find_spec(f"ssb.stages.{n}") is None]


def run_all(cfg: Config, run: RunDir, force: bool = False) -> dict:
    from ssb.cli import load_stage

    missing = missing_stages()
    t0 = time.time()
    results: dict = {}
    for name in PIPELINE:
        if name in missing:
            print(f"[run] stage '{name}' is not implemented yet; stopping before it "
                  f"(missing: {', '.join(missing)})", flush=True)
            return results
        print(f"\n=== {name} ===", flush=True)
        results[name] = load_stage(name)(cfg, run, force=force)
        if name == "curate" and not results[name].get("kept"):
            print("[run] no question had both a correct and a wrong rollout: nothing to teach. Try more "
                  "questions (data.train.limit), more rollouts (rollout.k) or easier data.", flush=True)
            return results
        if name == "teach" and not results[name].get("pairs"):
            print("[run] the teacher produced no verified solution: nothing to train on.", flush=True)
            return results
    if "evaluate" in missing:
        print("[run] evaluation is not implemented yet; stopping after training", flush=True)
        return results
    from ssb.stages.evaluate import compare, evaluate

    bench = cfg.eval.data.source
    dirs = []
    for tag, model in (("base", cfg.model), ("ssb", str(run.adapter_dir))):
        print(f"\n=== eval {tag} on held-out {bench} ===", flush=True)
        out = run.eval_dir(tag, bench)
        results[f"eval_{tag}"] = evaluate(cfg, model, None, out, force=force)
        dirs.append(out)
    print(f"\n=== base vs SSB (held-out {bench}) ===", flush=True)
    print(compare(dirs), flush=True)
    print(f"[run] finished in {time.time() - t0:.0f} s; run directory: {run.root}", flush=True)
    return results
