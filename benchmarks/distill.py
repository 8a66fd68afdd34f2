"""Distillation benchmark: sparse teacher storage and loss vs the full-vocabulary KL and a paper-style dense step.

    python benchmarks/distill.py [--quick] [--model DIR]

1. Teacher data: GSM8K training questions, the project's hinted prompt (question + a correct and a wrong attempt),
   and a solution sampled from that prompt by the model itself (T=0.4, top-k 50), as the teach stage does.
2. Storage table: for top-k stores with k in 8..512, and for the float16 hidden-state store, the bytes per token,
   the teacher mass the top-k holds at T, the relative error of the loss value, and the cosine between the gradient
   of our loss and of the exact full-vocabulary KL with respect to the student's final hidden states at the
   solution positions (everything the loss sends back into the network) and to its logits. The student is the
   same model on the plain prompt (LoRA at initialisation). The full run adds the cosine of the LoRA-parameter
   gradients (LoRA B perturbed from zero so that every LoRA matrix gets a gradient).
3. Training step, each variant in a fresh process (same LoRA model, gradient checkpointing, AdamW, batch 4 x S):
   ours = sparse rows read from a TeacherStore + chunked loss on solution positions; reference = the paper's
   scripts: dense fp32 teacher rows loaded per example from .npy files into a zero [4, S, V] tensor, full logits,
   softmax over every position, masked KL. Peak memory = the process's peak RSS over the steps (VmHWM, reset just
   before the first step) minus its RSS at that point (model weights resident, optimizer and data source set up),
   so it covers everything the steps allocate; torch CPU allocations are invisible to tracemalloc. Memory is
   measured in its own process per variant, run with MALLOC_MMAP_THRESHOLD_=131072 so that RSS follows live
   memory (glibc's adaptive default keeps freed activations in the heap: RSS then reads several times the live
   size). Time is measured in other processes with glibc's default allocator, as training runs: with the fixed
   threshold every large allocation is a fresh mmap whose pages fault in again (measured: our bf16 1-thread
   step, 38.4 s under it, 26.9 s without). Time = median over the steps after each process's warm-up step; the full run
   alternates ours / reference twice so that load drift on a shared machine affects both. Torch's default thread
   count (all cores) unless --threads says otherwise, as `ssb train` runs; --threads 1 gives steadier timings on
   a busy machine.
   Precision follows the trainer's `train.mixed_precision: auto` on this CPU (bf16 autocast where it has AMX
   or fast AVX512-BF16, else fp32) for both variants; --mixed-precision none|bf16 overrides.
   --quick uses the first 2 of the 30 layers (same vocabulary and head) and S = 512 so it fits in about 3
   minutes; the full run uses the whole model and S = 1024 (about 25 minutes on 2 busy cores).

4. Storage schemes (docs/teacher-store.md) at <= 1,000 bytes/token: topk (k = 249), sampled (250 draws from the
   teacher at T) and hybrid (top-k head + draws from the tail; the head among 64 and 124 chosen by its hidden-state
   cosine over 4 draws). Each is written to a real store and read back; cosine to the full-KL gradient at the
   hidden states and on the LoRA parameters, per step (mean over 10 independent draws) and for the mean gradient
   of the 10 steps (`grad_cosine_lora_avg`); the default is the scheme meeting 0.999 there (else the best).
   --skip-steps leaves out part 3; --pairs-cache keeps the generated teacher data for reruns.

Prints one final JSON line (with `schemes` and `default`); writes benchmarks/results/distill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import model_dir, save_result  # noqa: E402
from ssb.distill.loss import DenseTeacher, DistillLoss, OutputHead, SparseTeacher, final_hidden  # noqa: E402
from ssb.distill.store import (  # noqa: E402
    DTYPES,
    HIDDEN_DTYPE,
    TeacherStore,
    TeacherStoreWriter,
    auto_slots,
    auto_top_k,
    bytes_per_token,
    draw,
    example_generator,
    sparsify,
)

T = 2.0
KS = (8, 16, 32, 64, 128, 256, 512)
LORA = dict(
    r=32,
    lora_alpha=32,
    lora_dropout=0.0,
    task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
GSM8K = Path("/work/shared/data/gsm8k_train.jsonl")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter (VmHWM) here. ru_maxrss is no use: a child started by fork + exec inherits
    its parent's resident size as a floor."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ------------------------------------------------------------------------------------------ teacher data


def load_model(spec: str):
    """Model spec ('tiny', the embedded alias, a directory) -> (directory, fp32 model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir(spec))
    tok = AutoTokenizer.from_pretrained(path)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def make_pairs(model, tok, n: int, max_new: int, seed: int = 0) -> list[dict]:
    """n questions -> teacher/student prompt ids and a solution the model wrote from the hinted prompt."""
    from ssb.config import DEFAULT_SYSTEM_PROMPT
    from ssb.distill.pairs import encode_pairs
    from ssb.prompts import load_template, student_messages, teacher_messages

    if GSM8K.exists():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    else:
        rows = [
            {
                "question": f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many does he have?",
                "answer": f"{i + 3} + {2 * i + 5} = {3 * i + 8}\n#### {3 * i + 8}",
            }
            for i in range(n)
        ]
    template = load_template(None)
    recs = []
    for i, r in enumerate(rows):
        work, gold = r["answer"].split("####")
        gold = gold.strip()
        correct = work.strip() + f"\nThe final answer is \\boxed{{{gold}}}."
        wrong = f"{r['question'].split('.')[0]}... so the result is \\boxed{{{int(gold.replace(',', '')) + 7}}}."
        recs.append(
            {
                "id": f"q{i}",
                "teacher_messages": teacher_messages(template, r["question"], correct, wrong, DEFAULT_SYSTEM_PROMPT),
                "student_messages": student_messages(r["question"], DEFAULT_SYSTEM_PROMPT),
                "solution_ids": [0],
            }
        )
    pairs = encode_pairs(recs, tok)
    torch.manual_seed(seed)
    width = max(len(p.teacher_prompt) for p in pairs)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p.teacher_prompt)) + p.teacher_prompt for p in pairs])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p.teacher_prompt) for p in pairs])[:, None]).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.4,
            top_k=50,
            max_new_tokens=max_new,
            pad_token_id=tok.pad_token_id,
        )
    for p, row in zip(pairs, out[:, width:].tolist()):
        sol = []
        for t in row:
            sol.append(t)
            if t == tok.eos_token_id:
                break
        p.solution_ids = sol
    return pairs


def solution_states(model, prompts: list[list[int]], pairs) -> torch.Tensor:
    """[N, H] final hidden states at the positions predicting each pair's solution tokens (one sequence at a time)."""
    rows = []
    for prompt, p in zip(prompts, pairs):
        ids = torch.tensor([prompt + p.solution_ids])
        h = final_hidden(model, ids, torch.ones_like(ids))[0]
        rows.append(h[len(prompt) - 1 : len(prompt) - 1 + p.solution_len])
    return torch.cat(rows)


def topk_table(model, pairs, ks) -> tuple[list[dict], dict]:
    head = OutputHead.of(model)
    with torch.no_grad():
        ht = solution_states(model, [p.teacher_prompt for p in pairs], pairs)  # [N, H] teacher
        zt = head.logits(ht)  # [N, V]
        hs = solution_states(model, [p.student_prompt for p in pairs], pairs)  # [N, H] student
    targets = torch.tensor([t for p in pairs for t in p.solution_ids])
    n = len(targets)

    def full_kl(h_or_z, is_logits):  # brute force, dense, autograd
        z = h_or_z if is_logits else F.linear(h_or_z, head.weight)
        logq = torch.log_softmax(z / T, -1)
        logp = torch.log_softmax(zt / T, -1)
        return T * T * (logp.exp() * (logp - logq)).sum() / n

    def grads(fn, x):
        x = x.detach().clone().requires_grad_(True)
        val = fn(x)
        val.backward()
        return val.item(), x.grad

    kd_full, g_h_ref = grads(lambda h: full_kl(h, False), hs)
    with torch.no_grad():
        zs = F.linear(hs, head.weight)
    _, g_z_ref = grads(lambda z: full_kl(z, True), zs)
    table = []
    loss = DistillLoss(T)
    for k in tuple(ks) + ("hidden",):
        if k == "hidden":  # float16 teacher hidden states through the shared head: the exact distribution
            stored = DenseTeacher(ht.to(HIDDEN_DTYPE).float())
            row = {
                "k": "hidden",
                "bytes_per_token": bytes_per_token(0, "hidden", ht.shape[1]),
                "teacher_mass": 1.0,
                "teacher_mass_p05": 1.0,
            }
            z_teacher = DenseTeacher(head.logits(stored.states))
        else:
            exact = sparsify(zt, k, T)  # ids stay exact in storage (16 or 32 bit); log-probs are rounded
            stored = SparseTeacher(*(t.to(DTYPES[n]) for t, n in zip(exact, ("ids", "logprobs", "log_tail"))))
            stored = z_teacher = SparseTeacher(stored.ids.long(), stored.logprobs.float(), stored.log_tail.float())
            mass = exact.logprobs.exp().sum(-1)
            row = {
                "k": k,
                "bytes_per_token": bytes_per_token(k, vocab_size=head.vocab_size),
                "teacher_mass": round(mass.mean().item(), 4),
                "teacher_mass_p05": round(mass.quantile(0.05).item(), 4),
            }
        kd, g_h = grads(lambda h, s=stored: loss(h, targets, s, head=head).loss, hs)
        _, g_z = grads(lambda z, t=z_teacher: loss(z, targets, t).loss, zs)
        per_tok = F.cosine_similarity(g_h.double(), g_h_ref.double(), dim=-1)
        row.update(
            kd_rel_error=round(abs(kd - kd_full) / kd_full, 5),
            grad_cosine_hidden=round(cosine(g_h, g_h_ref), 5),
            grad_cosine_hidden_token_p05=round(per_tok.quantile(0.05).item(), 4),
            grad_cosine_logits=round(cosine(g_z, g_z_ref), 5),
        )
        table.append(row)
        print(
            f"k={k!s:>6}  {row['bytes_per_token']:5d} B/token  mass {row['teacher_mass']:.4f}  "
            f"kd err {row['kd_rel_error']:.2e}  cos(hidden) {row['grad_cosine_hidden']:.5f}  "
            f"cos(logits) {row['grad_cosine_logits']:.5f}",
            flush=True,
        )
    info = {
        "tokens": n,
        "examples": len(pairs),
        "kd_full": round(kd_full, 5),
        "mean_solution_len": round(n / len(pairs), 1),
    }
    return table, info


def lora_grad_cosine(model_path: Path, pairs, ks: list) -> dict:
    """Cosine between LoRA-parameter gradients of our loss (top-k stores, hidden store) and of the dense KL."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    head = OutputHead.of(base)
    with torch.no_grad():
        ht = solution_states(base, [p.teacher_prompt for p in pairs], pairs)
        zt = head.logits(ht)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(**LORA))
    for name, p in model.named_parameters():  # LoRA B starts at zero (A would get no gradient): perturb it
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    targets = torch.tensor([t for p in pairs for t in p.solution_ids])
    out = {}
    for k in ["full", *ks]:
        model.zero_grad()
        hs = solution_states(model, [p.student_prompt for p in pairs], pairs)
        if k == "full":
            logq = torch.log_softmax(F.linear(hs, head.weight) / T, -1)
            logp = torch.log_softmax(zt / T, -1)
            (T * T * (logp.exp() * (logp - logq)).sum() / len(targets)).backward()
        else:
            teacher = DenseTeacher(ht.to(HIDDEN_DTYPE).float()) if k == "hidden" else sparsify(zt, k, T)
            DistillLoss(T)(hs, targets, teacher, head=head).loss.backward()
        out[k] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).clone()
        print(f"LoRA gradient, {k}: done", flush=True)
    return {str(k): round(cosine(out[k], out["full"]), 5) for k in ks}


# ------------------------------------------------------------------------------------------ storage schemes


def write_scheme_store(root: Path, scheme: str, head: int, samples: int, seed: int, pairs, zts, vocab: int):
    """Store every pair's teacher rows with one scheme (draws seeded by (seed, pair id)) and read them back."""
    w = TeacherStoreWriter(
        root, temperature=T, top_k=head, vocab_size=vocab, fingerprint="bench", kind=scheme, samples=samples, seed=seed
    )
    for p, zt in zip(pairs, zts):
        rows = sparsify(zt, head, T) if scheme == "topk" else draw(zt, T, samples, head, example_generator(seed, p.id))
        w.add(p.id, rows)
    counts = w.close()
    store = TeacherStore(root)
    rows = [store[p.id] for p in pairs]
    return type(rows[0])(*(torch.cat(parts) for parts in zip(*rows))), counts["bytes_per_token"]


def scheme_table(
    model_path: Path, pairs, draws: int = 10, heads=(64, 124), search_draws: int = 4, lora_steps: int | None = None
) -> tuple[dict, list]:
    """Each storage scheme at <= 1 KB/token (topk; sampled; hybrid at the head size that does best at the hidden
    states): gradient cosine to the full-vocabulary KL at the student's hidden states and on the LoRA parameters,
    per step (mean over `draws` independent stores, seeds 0..draws-1) and for the mean gradient of those steps.
    The hybrid's head is chosen among `heads` by the hidden-state cosine of its mean over `search_draws` draws.
    A step's gradient is linear in the stored estimate, so the mean over steps is the gradient an optimizer
    accumulates over steps whose tokens carry independent draws (different examples, or a resampled store);
    top-k is deterministic, so its steps are all alike. The LoRA gradient is linear in the hidden-state gradient,
    so the mean over the steps takes one backward pass (of the mean); per-step LoRA cosines are taken on the first
    `lora_steps` draws (all by default: one backward pass each)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    head = OutputHead.of(base)
    vocab = head.vocab_size
    with torch.no_grad():
        ht = solution_states(base, [p.teacher_prompt for p in pairs], pairs)  # [N, H]
    lens = [p.solution_len for p in pairs]
    with torch.no_grad():
        zts = [head.logits(h) for h in ht.split(lens)]  # [L_i, V] per pair
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(**LORA))
    for name, prm in model.named_parameters():  # as lora_grad_cosine: LoRA B perturbed from zero
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=1e-3)
    params = [prm for prm in model.parameters() if prm.requires_grad]
    targets = torch.tensor([t for p in pairs for t in p.solution_ids])
    with torch.no_grad():
        hs = solution_states(model, [p.student_prompt for p in pairs], pairs)  # [N, H] student

    def grad_h(teacher) -> torch.Tensor:  # [N, H] d loss / d student hidden states
        x = hs.clone().requires_grad_(True)
        if teacher is None:  # exact full-vocabulary KL, dense
            logq = torch.log_softmax(F.linear(x, head.weight) / T, -1)
            logp = torch.log_softmax(torch.cat(zts) / T, -1)
            (T * T * (logp.exp() * (logp - logq)).sum() / len(targets)).backward()
        else:
            DistillLoss(T)(x, targets, teacher, head=head).loss.backward()
        return x.grad

    g_full = grad_h(None)
    slots = {"topk": auto_top_k(vocab), "sampled": auto_slots(vocab, "sampled"), "hybrid": auto_slots(vocab, "hybrid")}
    work = Path(tempfile.mkdtemp(prefix="ssb-scheme-bench-"))
    try:
        # Hybrid head size: the one whose averaged hidden-state gradient is closest to the full one.
        hybrid = {}
        for k in heads:
            gs = [
                grad_h(
                    write_scheme_store(work / f"h{k}-{d}", "hybrid", k, slots["hybrid"] - k, d, pairs, zts, vocab)[0]
                )
                for d in range(search_draws)
            ]
            hybrid[k] = round(cosine(torch.stack(gs).mean(0), g_full), 5)
            print(f"hybrid head {k}: cos(hidden) averaged over {search_draws} draws {hybrid[k]:.5f}", flush=True)
        best = max(hybrid, key=hybrid.get)
        configs = {
            "topk": (slots["topk"], 0),
            "sampled": (0, slots["sampled"]),
            "hybrid": (best, slots["hybrid"] - best),
        }
        g_h, bpt = {"full": [g_full]}, {}
        for name, (k, n_draws) in configs.items():
            g_h[name] = []
            for d in range(1 if name == "topk" else draws):
                teacher, bpt[name] = write_scheme_store(work / f"{name}-{d}", name, k, n_draws, d, pairs, zts, vocab)
                g_h[name].append(grad_h(teacher))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # LoRA gradients of the hidden-state gradients above: one forward per pair, one backward per vector.
    jobs = {("full", 0): g_full}
    for name, gs in g_h.items():
        if name != "full":
            jobs[(name, "avg")] = torch.stack(gs).mean(0)
            jobs.update({(name, i): g for i, g in enumerate(gs[: lora_steps or len(gs)])})
    g_lora = {key: torch.zeros(sum(prm.numel() for prm in params)) for key in jobs}
    start = 0
    for p, n in zip(pairs, lens):
        ids = torch.tensor([p.student_prompt + p.solution_ids])
        h = final_hidden(model, ids, torch.ones_like(ids))[0]
        h = h[len(p.student_prompt) - 1 : len(p.student_prompt) - 1 + n]  # [L, H]
        for key, g in jobs.items():
            grads = torch.autograd.grad(h, params, g[start : start + n], retain_graph=True)
            g_lora[key] += torch.cat([x.flatten() for x in grads])
        start += n
        print(f"LoRA gradients: pair {p.id} done ({len(jobs)} vectors)", flush=True)
    full = g_lora[("full", 0)]
    schemes = {}
    for name, (k, n_draws) in configs.items():
        steps = [cosine(g, full) for key, g in g_lora.items() if key[0] == name and key[1] != "avg"]
        schemes[name] = {
            "bytes_per_token": bpt[name],
            "bytes_per_token_payload": bytes_per_token(k, name, vocab_size=vocab, samples=n_draws),
            "head": k,
            "samples": n_draws,
            "grad_cosine_hidden": round(statistics.mean(cosine(g, g_full) for g in g_h[name]), 5),
            "grad_cosine_hidden_avg": round(cosine(torch.stack(g_h[name]).mean(0), g_full), 5),
            "grad_cosine_lora": round(statistics.mean(steps), 5),
            "grad_cosine_lora_steps": [round(c, 5) for c in steps],
            "grad_cosine_lora_avg": round(cosine(g_lora[(name, "avg")], full), 5),
        }
        print(f"{name}: {json.dumps(schemes[name])}", flush=True)
    info = {"hybrid_head_search": hybrid, "hybrid_search_draws": search_draws, "draws": draws}
    return schemes, {**info, "lora_steps": lora_steps or draws}


def choose_default(schemes: dict, target: float = 0.999, budget: int = 1000) -> tuple[str, bool]:
    """The scheme meeting the target (LoRA cosine averaged over steps) within the budget (payload bytes per token;
    shard headers add about 0.1 B on disk) with the best per-step LoRA cosine; if none meets it, the best averaged
    cosine within the budget. Returns (name, target met)."""
    fits = {n: r for n, r in schemes.items() if r["bytes_per_token_payload"] <= budget}
    meet = [n for n, r in fits.items() if r["grad_cosine_lora_avg"] >= target]
    if meet:
        return max(meet, key=lambda n: fits[n]["grad_cosine_lora"]), True
    return max(fits, key=lambda n: fits[n]["grad_cosine_lora_avg"]), False


# ------------------------------------------------------------------------------------------ training steps


def prepare_step_data(work: Path, model_path: Path, pairs, seq: int, layers: int | None, k: int) -> Path:
    """4 sequences of exactly `seq` student tokens (solutions concatenated to length), their teacher rows stored
    both ways (sparse store; dense fp32 .npy per example as the paper's scripts keep them), and the model."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        model_path = work / "model"
        model.save_pretrained(model_path)
    head = OutputHead.of(model)
    pool = [t for p in pairs for t in p.solution_ids]
    batch, writer = (
        [],
        TeacherStoreWriter(
            work / "store", temperature=T, top_k=k, vocab_size=head.vocab_size, fingerprint="bench", shard_size=4
        ),
    )
    for i, p in enumerate(pairs[:4]):
        n_sol = seq - len(p.student_prompt)
        sol = (pool[i * 37 :] + pool * (1 + n_sol // max(1, len(pool))))[:n_sol]
        with torch.no_grad():
            ids = torch.tensor([p.teacher_prompt + sol])
            h = final_hidden(model, ids, torch.ones_like(ids))[0, len(p.teacher_prompt) - 1 : -1]
            zt = torch.cat([head.logits(h[j : j + 256]) for j in range(0, len(h), 256)])  # [L, V]
        np.save(work / f"dense-{i}.npy", zt.numpy())
        writer.add(f"s{i}", sparsify(zt, k, T))
        batch.append({"id": f"s{i}", "prompt": p.student_prompt, "solution": sol})
    writer.close()
    (work / "batch.json").write_text(json.dumps({"model": str(model_path), "batch": batch}))
    return model_path


def run_variant(variant: str, work: Path, steps: int, threads: int, precision: str) -> dict:
    """One variant's training steps, in this (fresh) process; precision "bf16" runs both variants' forward passes
    and our loss under bf16 autocast, as the trainer does with train.mixed_precision=bf16 (the reference's loss
    runs on fp32 logits, as the Hugging Face Trainer's loss does on accelerate's fp32-converted outputs)."""
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ssb.distill.pairs import DistillCollator, Pair

    torch.set_num_threads(threads)
    spec = json.loads((work / "batch.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    with torch.no_grad():  # weights are mmapped: make them resident now so the baseline RSS includes them
        for p in model.parameters():
            p.data = p.data.clone()
    model = get_peft_model(model, LoraConfig(**LORA))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pairs = [Pair(b["id"], b["solution"], b["prompt"], []) for b in spec["batch"]]
    collate = DistillCollator(pad_id=0, store=TeacherStore(work / "store"))
    head, loss_fn = OutputHead.of(model), DistillLoss(T)
    vocab = head.vocab_size
    reset_peak_rss()
    base_rss, times = rss_bytes(), []
    for _ in range(1 + steps):
        t0 = time.perf_counter()
        b = collate(pairs)
        keep = b["shift_labels"].ne(-100)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        if variant == "ours":
            with autocast:
                h = final_hidden(model, b["input_ids"], b["attention_mask"])[keep]
                teacher = SparseTeacher(b["t_ids"], b["t_logprobs"], b["t_log_tail"])
                loss = loss_fn(h, b["shift_labels"][keep], teacher, head=head).loss
        else:  # the paper's collator and kd_loss_fn
            teacher_logits = torch.zeros(*b["input_ids"].shape, vocab)
            for i, p in enumerate(pairs):
                start = len(p.student_prompt) - 1
                teacher_logits[i, start : start + p.solution_len] = torch.from_numpy(np.load(work / f"dense-{i}.npy"))
            with autocast:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [B, S, V]
            logits = logits.float()
            student_logp = F.log_softmax(logits / T, dim=-1)
            with torch.no_grad():
                teacher_p = F.softmax(teacher_logits / T, dim=-1)
            flat = keep.view(-1)
            loss = (
                F.kl_div(student_logp.view(-1, vocab)[flat], teacher_p.view(-1, vocab)[flat], reduction="batchmean")
                * T
                * T
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        del loss
    return {
        "variant": variant,
        "step_s": statistics.median(times[1:]),
        "steps_s": [round(t, 3) for t in times],
        "peak_mem_bytes": peak_rss_bytes() - base_rss,
        "tokens": int(keep.sum()),
        "shape": list(keep.shape),
    }


def spawn_variant(variant: str, work: Path, steps: int, threads: int, precision: str, memory: bool) -> dict:
    """Run one variant in a fresh process: for peak memory (memory=True) or for step time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    if memory:
        # A fixed mmap threshold makes glibc hand every large freed block back to the OS at once; with its default
        # (adaptive) threshold, freed activations stay in the heap and RSS reads 5-10x the live memory.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--threads",
        str(threads),
        "--mixed-precision",
        precision,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_runs(timed: list[dict], memory: dict) -> dict:
    """Median step time over every measured step of the timing processes; the memory process's peak."""
    measured = [t for r in timed for t in r["steps_s"][1:]]
    return {
        **timed[0],
        "step_s": statistics.median(measured),
        "steps_s": [r["steps_s"] for r in timed],
        "peak_mem_bytes": memory["peak_mem_bytes"],
        "processes": len(timed),
    }


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer examples, 2-layer model for the step (< 3 min)")
    ap.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="model directory, or the embedded alias (default); 'tiny' builds a tiny random model",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, all cores, as training; 1: steadier on a busy machine)",
    )
    ap.add_argument(
        "--k",
        type=int,
        default=0,
        help="top-k for the storage and step measurements "
        "(0: logits.top_k's automatic choice, the largest k within 1 KB/token)",
    )
    ap.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "none", "bf16"],
        help="autocast for both training steps (auto: train.mixed_precision's choice on this CPU)",
    )
    ap.add_argument(
        "--skip-steps",
        action="store_true",
        help="skip the training-step timing and memory (part 3): storage and gradient measurements only",
    )
    ap.add_argument(
        "--only-schemes",
        action="store_true",
        help="only the storage-scheme comparison (part 4): no top-k table, no LoRA table by k, no step timing",
    )
    ap.add_argument(
        "--lora-steps",
        type=int,
        default=0,
        help="per-step LoRA cosines on this many of the 10 draws (0: all; one backward pass each)",
    )
    ap.add_argument("--search-draws", type=int, default=4, help="draws per hybrid head size when choosing the head")
    ap.add_argument(
        "--pairs-cache",
        help="JSON file holding the teacher data: read if it exists, else generated and written there (reruns)",
    )
    ap.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = args.threads or torch.get_num_threads()
    if args.variant:
        print(json.dumps(run_variant(args.variant, Path(args.work), args.steps, args.threads, args.mixed_precision)))
        return 0
    torch.set_num_threads(args.threads)
    from ssb.models import resolve_mixed_precision

    precision = resolve_mixed_precision(args.mixed_precision, "cpu")
    t_start = time.time()
    n, max_new, seq, layers, steps = (4, 96, 512, 2, 1) if args.quick else (8, 320, 1024, None, 2)
    model_path, model, tok = load_model(args.model)
    cache = Path(args.pairs_cache) if args.pairs_cache else None
    if cache is not None and cache.exists():
        from ssb.distill.pairs import Pair

        pairs = [Pair(**p) for p in json.loads(cache.read_text())]
    else:
        pairs = make_pairs(model, tok, n, max_new)
        if cache is not None:
            cache.write_text(json.dumps([vars(p) for p in pairs]))
    print(
        f"teacher data: {n} GSM8K questions, solutions of {[p.solution_len for p in pairs]} tokens "
        f"({time.time() - t_start:.0f} s)",
        flush=True,
    )
    vocab = OutputHead.of(model).vocab_size
    args.k = args.k or auto_top_k(vocab)
    if args.only_schemes:
        args.skip_steps = True
        n_tok = sum(p.solution_len for p in pairs)
        table, info, lora_cos = [], {"tokens": n_tok, "examples": len(pairs)}, None
        row = {"grad_cosine_hidden": None, "grad_cosine_logits": None, "teacher_mass": None}
    else:
        table, info = topk_table(model, pairs, sorted(set(KS) | {args.k}))
        row = next(r for r in table if r["k"] == args.k)
        lora_cos = None if args.quick else lora_grad_cosine(model_path, pairs, sorted({64, 128, args.k}) + ["hidden"])
    schemes, scheme_info = scheme_table(
        model_path,
        pairs,
        draws=2 if args.quick else 10,
        search_draws=args.search_draws,
        lora_steps=args.lora_steps or None,
    )
    default, met = choose_default(schemes)
    print(f"storage schemes: default {default} ({'meets' if met else 'misses'} the 0.999 LoRA target)", flush=True)
    del model
    ours = ref = None
    stored_bpt = schemes["topk"]["bytes_per_token"]
    if not args.skip_steps:
        work = Path(tempfile.mkdtemp(prefix="ssb-distill-bench-"))
        try:
            prepare_step_data(work, model_path, pairs, seq, layers, args.k)
            idx = json.loads((work / "store" / "index.json").read_text())
            stored_bpt = sum(s["bytes"] for s in idx["shards"]) / sum(s["tokens"] for s in idx["shards"])
            runs: dict[str, list[dict]] = {"ours": [], "reference": []}
            for _ in range(1 if args.quick else 2):  # alternate, so load drift on a shared machine hits both alike
                for variant in runs:
                    runs[variant].append(spawn_variant(variant, work, steps, args.threads, precision, memory=False))
            mem = {v: spawn_variant(v, work, 1, args.threads, precision, memory=True) for v in runs}
            ours, ref = (merge_runs(runs[v], mem[v]) for v in ("ours", "reference"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": str(model_path),
        "quick": args.quick,
        "k": args.k,
        "temperature": T,
        "threads": args.threads,
        "bytes_per_token": round(stored_bpt, 1),
        "bytes_per_token_payload": bytes_per_token(args.k, vocab_size=vocab),
        "dense_fp32_bytes_per_token": 4 * vocab,
        "grad_cosine": row["grad_cosine_hidden"],
        "grad_cosine_logits": row["grad_cosine_logits"],
        "grad_cosine_hidden_store": table[-1]["grad_cosine_hidden"] if table else None,
        "lora_grad_cosine": lora_cos,
        "teacher_mass": row["teacher_mass"],
        "topk_table": table,
        "schemes": schemes,
        "default": default,
        "target_met": met,
        **scheme_info,
        **info,
        "step_config": {
            "batch": ours["shape"] if ours else None,
            "solution_tokens": ours["tokens"] if ours else None,
            "layers": layers or "all",
            "gradient_checkpointing": True,
            "lora_r": 32,
            "mixed_precision": precision,
            "skipped": args.skip_steps,
        },
        "ours": ours,
        "reference": ref,
        "peak_mem_ratio": round(ours["peak_mem_bytes"] / ref["peak_mem_bytes"], 4) if ours else None,
        "step_speedup": round(ref["step_s"] / ours["step_s"], 3) if ours else None,
        "seconds": round(time.time() - t_start, 1),
    }
    save_result("distill", result)
    if ours:
        print(
            f"ours: {ours['step_s']:.2f} s/step, +{ours['peak_mem_bytes'] / 2**20:.0f} MiB peak; reference: "
            f"{ref['step_s']:.2f} s/step, +{ref['peak_mem_bytes'] / 2**20:.0f} MiB peak"
        )
    print(
        json.dumps(
            {
                **{
                    k: result[k]
                    for k in (
                        "bytes_per_token",
                        "grad_cosine",
                        "peak_mem_ratio",
                        "step_speedup",
                        "grad_cosine_hidden_store",
                        "lora_grad_cosine",
                        "teacher_mass",
                        "k",
                        "quick",
                        "schemes",
                        "default",
                        "target_met",
                    )
                },
                "mixed_precision": precision,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
