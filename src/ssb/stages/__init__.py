"""The stages of SSB and the command-line verbs over them, registered in one place.

Each stage is a plain function `stage(cfg, run, force=False)` in a module of this package, over files in a run
directory (`ssb.rundir`). `VERBS` is read by both the CLI (`ssb <verb>`) and `ssb run` (the `PIPELINE` order).
Modules are imported only when a verb runs, so `ssb --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    name: str
    module: str
    function: str  # the stage function, or for own-argument verbs the `main(argv) -> exit code`
    help: str
    own_args: bool = False  # parses its own arguments (no --config / --set / --run-dir)


VERBS: dict[str, Verb] = {
    v.name: v
    for v in (
        Verb("rollout", "ssb.stages.rollout", "rollout", "sample K answers per training question and verify them"),
        Verb("curate", "ssb.stages.curate", "curate", "keep mixed questions; build hinted teacher prompts"),
        Verb("teach", "ssb.stages.teach", "teach", "teacher writes a verified solution from the hinted prompt"),
        Verb("logits", "ssb.stages.logits", "logits", "store the teacher's sparse distribution over each solution"),
        Verb("train", "ssb.stages.train", "train", "distil into a LoRA student (KL at temperature T)"),
        Verb("grpo", "ssb.stages.grpo", "grpo", "GRPO baseline (TRL) on the same questions and reward"),
        Verb("eval", "ssb.stages.evaluate", "eval_from_args", "pass@1 / pass@k / maj@k of a model on a benchmark"),
        Verb("run", "ssb.stages.run", "run_all", "all stages in order, the baselines, then every model evaluated"),
        Verb(
            "compare",
            "ssb.stages.compare",
            "compare_main",
            "table of eval summaries with paired significance tests",
            True,
        ),
        Verb("report", "ssb.stages.report", "report_main", "HTML + markdown report of one or more runs", True),
        Verb(
            "experiment",
            "ssb.experiment.cli",
            "experiment_main",
            "arms x seeds x eval sets from one YAML, with intervals over seeds and problems",
            True,
        ),
        Verb("verify", "ssb.verify.cli", "verify_main", "check answers against gold answers", True),
    )
}

# `ssb run`'s SSB stages, in order; each reads what the one before it wrote
PIPELINE = ("rollout", "curate", "teach", "logits", "train")


def load(name: str):
    """The function behind a verb (imported now)."""
    verb = VERBS[name]
    return getattr(importlib.import_module(verb.module), verb.function)
