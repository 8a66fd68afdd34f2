"""Benchmark: the rollout stage data-parallel over 2 processes x 1 thread against 1 process x 1 thread.

The same work both ways: `ssb rollout` on the first N level-1 arithmetic training questions x K samples (T=0.8,
top-k 50, the engine), once as one process and once under `torchrun --standalone --nproc-per-node 2`, each
process with OMP_NUM_THREADS=1, each in a fresh run directory. Throughput is generated tokens over the stage's
own seconds from the manifest (rank 0's: model load, its share of the generation, the wait for the other rank
and the merge), so interpreter start-up is left out; the wall time of the whole command is reported beside it.
With --repeats R the two alternate R times and the spread is reported. It also checks that both runs hold the
same (question, sample) records and how many texts are identical (per-sample random streams: all, unless
batched floating point flips a token).

Usage: benchmarks/parallel.py [--quick] [--model smollm2-135m-instruct] [--questions 32] [--k 4] [--max-new-tokens 96]
       [--batch-size 64] [--repeats 2]
Prints one final JSON line and writes benchmarks/results/parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import model_dir, save_result  # noqa: E402
from ssb.config import EMBEDDED_MODEL  # noqa: E402
from ssb.files import read_jsonl  # noqa: E402
from ssb.parallel import World, share  # noqa: E402
from ssb.rundir import RunDir  # noqa: E402


def run_rollout(cfg: Path, run: RunDir, procs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable]
    if procs > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd += ["-m", "ssb", "rollout", "--config", str(cfg), "--run-dir", str(run.root)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    entry = run.stage_entry("rollout")
    tokens, seconds = entry["counts"]["tokens"], entry["seconds"]
    return {
        "processes": procs,
        "world_size": entry.get("world_size"),
        "tokens": tokens,
        "stage_seconds": seconds,
        "wall_seconds": round(wall, 2),
        "tok_per_s": round(tokens / seconds, 2),
    }


def samples(run: RunDir) -> dict:
    return {(r["id"], j): s["text"] for r in read_jsonl(run.rollouts) for j, s in enumerate(r["rollouts"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 questions x 4 x 48 tokens, one repeat")
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.questions, args.max_new_tokens, args.repeats = 16, 48, 1
    model = model_dir(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="ssb-bench-parallel-"))
    cfg = tmp / "bench.yaml"
    cfg.write_text(
        f"model: {model}\n"
        "generation_backend: engine\n"
        f"data: {{train: {{source: arith, level: 1, limit: {args.questions}}}}}\n"
        f"rollout: {{k: {args.k}, max_new_tokens: {args.max_new_tokens}, batch_size: {args.batch_size}, "
        "temperature: 0.8, top_k: 50}\n"
    )
    rows: dict[int, list[dict]] = {1: [], 2: []}
    runs: dict[int, RunDir] = {}
    for rep in range(args.repeats):
        for procs in (1, 2) if rep % 2 == 0 else (2, 1):  # alternate, so drift hits both alike
            runs[procs] = RunDir(tmp / f"p{procs}-r{rep}")
            rows[procs].append(run_rollout(cfg, runs[procs], procs))
            print(json.dumps(rows[procs][-1]), flush=True)
    one, two = samples(runs[1]), samples(runs[2])
    ratios = [b["tok_per_s"] / a["tok_per_s"] for a, b in zip(rows[1], rows[2])]
    result = {
        "benchmark": "parallel",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "workload": f"rollout: {args.questions} arith questions x K={args.k}, max {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, T=0.8, {args.model}",
        "one_process": rows[1],
        "two_processes": rows[2],
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratios": [round(r, 3) for r in ratios],
        "questions_per_rank": [len(share(sorted({i for i, _ in two}), World(r, 2, r))) for r in range(2)],
        "same_records": set(one) == set(two) and len(one) == args.questions * args.k,
        "identical_texts": f"{sum(one[k] == two.get(k) for k in one)}/{len(one)}",
    }
    print(f"results -> {save_result('parallel', result)}", flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
