"""Benchmark: ssb.engine.Engine vs one-sequence-at-a-time `model.generate`, and the matmul roofline.

Workload (the rollout stage): GSM8K-style questions with a math-tutor system prompt, K samples each,
temperature 0.8, top-k 50. Full mode: 64 questions x K=4 x 256 new tokens; --quick: 16 x 4 x 64.
The reference (HF `generate`, batch 1, same sampling settings) runs in the same process on a subset of the
prompts; its tokens/s is comparable because per-token cost of batch-1 decoding does not depend on which prompt.
The engine runs in the generating stages' default dtype (`generation_dtype: auto`: bf16 on a CPU whose bf16
matmuls beat fp32 (AMX; AVX512-BF16 where measured faster), else fp32; `--dtype` overrides); the reference runs
the fp32 model, as the issue's one-at-a-time baseline does. When the engine is not fp32, the engine's fp32 speed
is measured too (`engine_fp32_tok_per_s`), so the gain from batching and the gain from bf16 are both visible, and
so is the engine with bf16 weights but a float32 KV cache (`engine_fp32_kv_tok_per_s`, the CPU default before
2026-12-05).
The roofline is the measured matmul FLOP/s (in the engine's dtype; the fp32 rate is reported beside it) divided
by 2 x (non-embedding + lm_head) parameters. Also checks on a few prompts that the fp32 engine's greedy output
equals greedy `generate` token for token.

`contenders` (in the final JSON line): each generator run alone in a subprocess of this script (so its peak
RSS is its own: ru_maxrss of that process, weights included) on the same prompts and sampling settings:
`engine` (ssb's engine, all prompts x K, with its peak KV bytes allocated and in use) and `hf_generate` (HF
`generate` one sequence at a time, on the first --ref-prompts prompts, 1 sample each: per-token cost of batch-1
decoding does not depend on the prompt).
vLLM is a contender when its venv exists (scripts/install-vllm.sh; --vllm-python): same prompts, k, sampling settings,
dtype and batch size (max_num_seqs), in a subprocess; its tok/s (start-up excluded, reported apart) and the peak
resident memory of its process tree go under `contenders.vllm` in the final JSON line.

Usage: benchmarks/generation.py [--quick] [--model PATH] [--batch-size 64] [--threads N] [--dtype auto]
       [--contenders engine,hf_generate] [--no-in-process] [--vllm-python .venv-vllm/bin/python | none]
Prints one final JSON line and writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import data_file, model_dir, save_result  # noqa: E402
from ssb.engine.engine import Engine, SamplingParams, tokenize_prompts  # noqa: E402

SYSTEM = "You are a helpful math tutor. Solve the problem step by step and give the final answer as \\boxed{}."
GSM8K = data_file("gsm8k_test.jsonl")  # $SSB_DATA_DIR or ../shared/data


def questions(count: int) -> list[str]:
    """The first `count` GSM8K test questions if the file is present, else generated arithmetic word problems."""
    if GSM8K is not None:
        with GSM8K.open() as f:
            qs = [json.loads(line)["question"] for line, _ in zip(f, range(count))]
        if len(qs) == count:
            return qs
    rng = random.Random(0)
    names, items = ["Tom", "Sara", "Ali", "Mei", "Noah"], ["apples", "pencils", "stickers", "marbles"]
    out = []
    for _ in range(count):
        a, b, c = rng.randint(5, 90), rng.randint(2, 30), rng.randint(2, 9)
        out.append(
            f"{rng.choice(names)} has {a} {rng.choice(items)}, buys {b} more and then shares them "
            f"equally among {c} friends. How many does each friend get, and how many are left over?"
        )
    return out


def workload(n_q: int, max_new: int) -> tuple[list, SamplingParams]:
    """The benchmark's chat prompts (system prompt + question) and sampling settings, shared by every contender."""
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions(n_q)]
    return prompts, SamplingParams(temperature=0.8, top_k=50, max_new_tokens=max_new, seed=0)


def matmul_flops(seconds: float = 3.0, n: int = 2048, dtype=torch.float32) -> float:
    """Sustained FLOP/s of an n x n matmul in `dtype` on this CPU, best of repeated timings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flop_params(model) -> int:
    """Parameters touched per generated token by matmuls: everything but the input embedding, plus lm_head."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    return total - emb.numel() + (head.numel() if head is emb else 0)


def reference(model, tok, prompts, samples: int, params: SamplingParams) -> tuple[int, float]:
    """One-at-a-time HF generate: (generated tokens, seconds)."""
    tokens, seconds = 0, 0.0
    for p in prompts:
        enc = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for s in range(samples):
            torch.manual_seed(params.seed + s)
            t = time.perf_counter()
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=params.temperature,
                top_k=params.top_k,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
            seconds += time.perf_counter() - t
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens, seconds


def greedy_check(model, tok, engine, prompts, max_new: int) -> list[bool]:
    got = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new))
    same = []
    for p, comps in zip(prompts, got):
        enc = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=sorted(engine.stop_ids),
            pad_token_id=tok.pad_token_id,
        )
        same.append(out[0, enc["input_ids"].shape[1] :].tolist() == comps[0].token_ids)
    return same


def timed_tok_per_s(engine, prompts, k, params) -> float:
    t = time.perf_counter()
    tokens = sum(c.num_tokens for r in engine.generate(prompts, k, params) for c in r)
    return tokens / (time.perf_counter() - t)


def peak_rss_bytes() -> int:
    """This process's lifetime peak RSS (the contender subprocess's own)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def contender_engine(model, tok, prompts, k, params, batch_size) -> dict:
    engine = Engine(model, tok, batch_size=batch_size, progress=False)
    t = time.perf_counter()
    tokens = sum(c.num_tokens for r in engine.generate(prompts, k, params) for c in r)
    seconds = time.perf_counter() - t
    stats = engine.last_stats
    return {
        "tok_per_s": round(tokens / seconds, 1),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "sequences": len(prompts) * k,
        "kv_bytes_allocated": stats.get("kv_bytes_allocated"),
        "kv_bytes_used": stats.get("kv_bytes_used"),
        "kv_allocated_over_used": round(stats["kv_bytes_allocated"] / stats["kv_bytes_used"], 3)
        if stats.get("kv_bytes_used")
        else None,
        "rows": stats.get("rows"),
        "backend": engine.backend,
        "attention": stats.get("attention"),
    }


def contender_hf_generate(model, tok, prompts, k, params, batch_size) -> dict:
    tokens, seconds = reference(model, tok, prompts, 1, params)
    return {"tok_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2)}


# name -> (function, whether it runs on the --ref-prompts subset one sequence at a time). A vLLM contender
# (ssb's vLLM backend, where installed) belongs here: same signature, same returned fields.
CONTENDERS = {"engine": (contender_engine, False), "hf_generate": (contender_hf_generate, True)}


def run_contender(name: str, args, n_q: int, max_new: int, ref_prompts: int) -> None:
    """Inside the subprocess: load the model, run one contender, print its JSON line (with its peak RSS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.models import resolve_generation_dtype

    model_path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    fn, one_at_a_time = CONTENDERS[name]
    dtype = torch.float32 if one_at_a_time else resolve_generation_dtype(args.dtype, "float32", "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    prompts, params = workload(n_q, max_new)
    if one_at_a_time:
        prompts = prompts[:ref_prompts]
    with torch.no_grad():
        result = fn(model, tok, prompts, args.k, params, args.batch_size)
    result.update(peak_rss_bytes=peak_rss_bytes(), dtype=str(dtype).removeprefix("torch."))
    print(json.dumps(result))


def without_contenders(argv: list[str]) -> list[str]:
    """argv without --contenders and its value (either `--contenders a,b` or `--contenders=a,b`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--contenders":
            skip = True
        elif not a.startswith("--contenders="):
            out.append(a)
    return out


def contenders(args, names: list[str]) -> dict:
    """Each contender in its own subprocess of this script; name -> its JSON result."""
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--contender", name] + without_contenders(sys.argv[1:])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        out[name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-2000:]}
    return out


def bench_vllm(prompts, k: int, params: SamplingParams, model_path: str, dtype: str, batch_size: int, python: str):
    """vLLM as a contender on the same prompts and sampling settings: runs `--vllm-worker` in a subprocess with
    the vLLM venv's `python` (scripts/install-vllm.sh), sampling the peak resident memory of its whole process tree
    (vLLM's engine runs in child processes). Returns {tok_per_s, peak_rss_gb, ...} or {"error": why}."""
    import subprocess
    import tempfile

    import psutil

    if not Path(python).exists():
        return {"error": f"no vLLM python at {python} (run scripts/install-vllm.sh or pass --vllm-python)"}
    spec = {
        "prompts": prompts,
        "k": k,
        "params": vars(params),
        "model": model_path,
        "dtype": dtype,
        "batch_size": batch_size,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.Popen(
        [python, __file__, "--vllm-worker", f.name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    peak, root = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.25)
    Path(f.name).unlink()
    lines = [line for line in proc.stdout.read().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"vLLM worker exited with {proc.returncode}"}
    return {**json.loads(lines[-1]), "peak_rss_gb": round(peak / 1e9, 2)}


def vllm_worker(spec_path: str) -> None:
    """The subprocess side of bench_vllm: start vLLM, generate, print one JSON line."""
    from transformers import AutoTokenizer

    from ssb.engine.vllm import VllmGenerator

    spec = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(spec["model"])
    t = time.perf_counter()
    gen = VllmGenerator(spec["model"], tok, dtype=spec["dtype"], batch_size=spec["batch_size"], progress=False)
    # start the engine with the KV cache the timed call gets in a stage (sized by its first call: all prompts x
    # k sequences of longest prompt + max_new_tokens), then one short request so first-call overheads are excluded
    longest = max(len(ids) for ids in tokenize_prompts(tok, spec["prompts"]))
    gen.start(longest + spec["params"]["max_new_tokens"], len(spec["prompts"]) * spec["k"])
    gen.generate(spec["prompts"][:1], 1, SamplingParams(temperature=0, max_new_tokens=1))
    startup = time.perf_counter() - t
    t = time.perf_counter()
    comps = [c for r in gen.generate(spec["prompts"], spec["k"], SamplingParams(**spec["params"])) for c in r]
    seconds = time.perf_counter() - t
    tokens = sum(c.num_tokens for c in comps)
    result = {
        "tok_per_s": round(tokens / seconds, 1),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "startup_s": round(startup, 1),
        "kv_cache_gib": round(gen.kv_cache_bytes / 2**30, 2),
        "finish_length_fraction": round(sum(c.finish_reason == "length" for c in comps) / len(comps), 3),
        "backend": gen.backend,
    }
    gen.close()
    print(json.dumps(result), flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--vllm-worker":
        return vllm_worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 3 minutes)")
    ap.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model directory, or the embedded alias (default); 'tiny' builds a tiny random model",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--questions", type=int, default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--ref-prompts", type=int, default=None, help="prompts for the one-at-a-time reference")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="engine weights dtype (auto: as the generating stages choose on this machine)",
    )
    ap.add_argument(
        "--contenders", default="engine,hf_generate", help="comma-separated, from: " + ", ".join(CONTENDERS)
    )
    ap.add_argument("--contender", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)  # inside a subprocess
    ap.add_argument("--no-in-process", action="store_true", help="only the contenders (skip the in-process run)")
    ap.add_argument(
        "--vllm-python",
        default=str(ROOT / ".venv-vllm" / "bin" / "python"),
        help="python of the vLLM venv (scripts/install-vllm.sh); 'none' skips the vLLM contender",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_q = args.questions or (16 if args.quick else 64)
    max_new = args.max_new_tokens or (64 if args.quick else 256)
    ref_prompts = args.ref_prompts or (2 if args.quick else 4)
    if args.contender:
        run_contender(args.contender, args, n_q, max_new, ref_prompts)
        return
    names = [n for n in args.contenders.split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        ap.error(f"unknown contender(s) {unknown}; choose from {sorted(CONTENDERS)}")
    if args.no_in_process:
        result = {"contenders": contenders(args, names)}
        if args.vllm_python != "none":  # the same prompts, sampling settings and dtype as the engine contender
            from ssb.models import resolve_generation_dtype

            prompts, params = workload(n_q, max_new)
            dtype = str(resolve_generation_dtype(args.dtype, "float32", "cpu")).removeprefix("torch.")
            vllm = bench_vllm(prompts, args.k, params, model_dir(args.model), dtype, args.batch_size, args.vllm_python)
            result["contenders"]["vllm"] = vllm
        save_result("generation", result)
        print(json.dumps(result))
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts, params = workload(n_q, max_new)

    from ssb.models import resolve_generation_dtype

    dtype = resolve_generation_dtype(args.dtype, "float32", "cpu")
    gen_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    flops = matmul_flops(dtype=dtype)
    n_params = flop_params(model)
    engine = Engine(gen_model, tok, batch_size=args.batch_size, progress=False)

    first_done = []
    t0 = time.perf_counter()
    results = engine.generate(
        prompts, args.k, params, callback=lambda i, c: first_done.append(time.perf_counter() - t0)
    )
    engine_s = time.perf_counter() - t0
    comps = [c for r in results for c in r]
    engine_tokens = sum(c.num_tokens for c in comps)
    fp32_engine, fp32_tps, fp32_kv_tps = engine, engine_tokens / engine_s, None
    if gen_model is not model:
        fp32_engine = Engine(model, tok, batch_size=args.batch_size, progress=False)
        fp32_tps = timed_tok_per_s(fp32_engine, prompts, args.k, params)
        # the engine's default KV dtype against a float32 cache under the same weights, in this run
        fp32_kv = Engine(gen_model, tok, batch_size=args.batch_size, progress=False, kv_dtype=torch.float32)
        fp32_kv_tps = timed_tok_per_s(fp32_kv, prompts, args.k, params)

    ref_tokens, ref_s = reference(model, tok, prompts[:ref_prompts], 1, params)
    greedy_same = greedy_check(model, tok, fp32_engine, prompts[: 2 if args.quick else 3], 32 if args.quick else 64)

    engine_tps, ref_tps = engine_tokens / engine_s, ref_tokens / ref_s
    result = {
        "engine_tok_per_s": round(engine_tps, 1),
        "reference_tok_per_s": round(ref_tps, 1),
        "speedup": round(engine_tps / ref_tps, 2),
        "roofline_tok_per_s": round(flops / (2 * n_params), 1),
        "fraction_of_roofline": round(engine_tps / (flops / (2 * n_params)), 3),
        "engine_fp32_tok_per_s": round(fp32_tps, 1),
        "engine_fp32_kv_tok_per_s": fp32_kv_tps and round(fp32_kv_tps, 1),
        "matmul_gflop_per_s": round(flops / 1e9, 1),
        "matmul_fp32_gflop_per_s": round((flops if dtype == torch.float32 else matmul_flops()) / 1e9, 1),
        "flop_params": n_params,
        "engine_tokens": engine_tokens,
        "engine_seconds": round(engine_s, 2),
        "first_prompt_done_s": round(first_done[0], 2),
        "finish_length_fraction": round(sum(c.finish_reason == "length" for c in comps) / len(comps), 3),
        "reference_tokens": ref_tokens,
        "reference_seconds": round(ref_s, 2),
        "reference_sequences": ref_prompts,
        "greedy_matches_generate": f"{sum(greedy_same)}/{len(greedy_same)}",
        "settings": {
            "model": model_path,
            "backend": engine.backend,
            "device": str(engine.device),
            "dtype": str(gen_model.dtype),
            "reference_dtype": str(model.dtype),
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "questions": n_q,
            "k": args.k,
            "max_new_tokens": max_new,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "quick": args.quick,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    result["contenders"] = contenders(args, names)
    if args.vllm_python != "none":
        vllm_dtype = str(gen_model.dtype).removeprefix("torch.")
        vllm = bench_vllm(prompts, args.k, params, model_path, vllm_dtype, args.batch_size, args.vllm_python)
        result.setdefault("contenders", {})["vllm"] = vllm
    save_result("generation", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
