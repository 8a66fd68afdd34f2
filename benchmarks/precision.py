"""How far bf16 moves SmolLM2's next-token distributions from fp32 (the cost of `generation_dtype: auto`).

    python benchmarks/precision.py [--model DIR] [--questions 8] [--tokens 96]

Texts: the first GSM8K test questions (generated arithmetic problems without ../shared) in the rollout prompt, each
followed by the fp32 model's own greedy answer. Over every answer position, against the fp32 model's distribution:
the model cast to bf16 (what the generating stages decode with on CPUs whose bf16 matmuls beat fp32), the fp32 model
under bf16 autocast (what training runs under), the generation engine's bf16 prefill at 4 cut points per text, and
the engine's bf16 decode path teacher-forced along each answer (one step per token: paged caches, merged attention)
with its bf16 KV cache, with a float32 one (`kv_dtype`), and with its decode attention in torch ops instead of the
fused CPU kernel (`engine_bf16_decode_torch_attention`; `settings.decode_attention` says which the others used).
Reports mean KL(fp32 || variant) in nats per token and the share of positions whose most likely token agrees.
Prints one final JSON line; writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import model_dir, save_result  # noqa: E402
from generation import questions  # noqa: E402
from ssb.config import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from ssb.engine.cache import SlotModel  # noqa: E402
from ssb.engine.engine import Engine, SamplingParams  # noqa: E402


def kl_and_agree(ref: torch.Tensor, other: torch.Tensor) -> tuple[list[float], list[bool]]:
    """ref/other: [N, V] logits -> per-row KL(p_ref || p_other) and top-1 agreement."""
    lr, lo = F.log_softmax(ref.float(), -1), F.log_softmax(other.float(), -1)
    kl = (lr.exp() * (lr - lo)).sum(-1)
    return kl.tolist(), (ref.argmax(-1) == other.argmax(-1)).tolist()


def teacher_forced_decode(model, tok, prompt_messages, answer: list[int], kv_dtype, kernel=True) -> torch.Tensor:
    """The engine's next-token logits over `answer` [n, V]: its prompt prefilled, then one decode step per answer
    token fed (the path every generated token after the first takes: paged KV cache, merged attention). kernel:
    decode attention through the fused CPU kernel where it builds (the default), else torch ops."""
    text = tok.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    sm = SlotModel(model, len(prompt), len(answer), kv_dtype)
    if not kernel:
        sm.kernel = None
    sm.set_limits(1, 1)
    logits = [sm.prefill([prompt], [0])[0]]
    one = torch.tensor([[0]])
    for step, token in enumerate(answer[:-1]):
        out = sm.decode([0], [token], [step], [len(prompt)], one, one.view(-1), torch.tensor([len(prompt)]))
        logits.append(out[0])
    return torch.stack(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model directory or the embedded alias")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96, help="greedy answer length")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    m32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    prompts = [
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}]
        for q in questions(args.questions)
    ]
    engine = Engine(m32, tok, batch_size=len(prompts), progress=False)
    answers = engine.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=args.tokens))
    stats: dict[str, tuple[list, list]] = {
        "bf16_weights": ([], []),
        "bf16_autocast": ([], []),
        "engine_bf16_prefill": ([], []),
    }
    prefixes, prefix_ref, refs = [], [], []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            text = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + a[0].token_ids])
            span = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions predicting the answer tokens
            ref = m32(ids).logits[0, span]
            refs.append(ref)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = m32(ids).logits[0, span]
            for name, other in (("bf16_weights", m16(ids).logits[0, span]), ("bf16_autocast", auto)):
                kl, agree = kl_and_agree(ref, other)
                stats[name][0].extend(kl)
                stats[name][1].extend(agree)
            n = len(a[0].token_ids)
            for cut in sorted({n // 4, n // 2, 3 * n // 4, n - 1}):
                prefixes.append(prompt + a[0].token_ids[:cut])
                prefix_ref.append(ref[cut])
        sm = SlotModel(m16, max(map(len, prefixes)), 1)
        sm.set_limits(1, len(prefixes))
        kl, agree = kl_and_agree(torch.stack(prefix_ref), sm.prefill(prefixes, list(range(len(prefixes)))))
        stats["engine_bf16_prefill"] = (kl, agree)
        variants = (
            ("engine_bf16_decode_fp32_kv", torch.float32, True),
            ("engine_bf16_decode", None, True),
            ("engine_bf16_decode_torch_attention", None, False),
        )
        for name, kv_dtype, kernel in variants:
            for p, a, ref in zip(prompts, answers, refs):
                logits = teacher_forced_decode(m16, tok, p, a[0].token_ids, kv_dtype, kernel)
                kl, agree = kl_and_agree(ref, logits)
                stats.setdefault(name, ([], []))[0].extend(kl)
                stats[name][1].extend(agree)
    result = {
        name: {
            "mean_kl_nats": round(sum(k) / len(k), 6),
            "top1_agreement": round(sum(g) / len(g), 4),
            "positions": len(k),
        }
        for name, (k, g) in stats.items()
    }
    result["settings"] = {
        "model": path,
        "questions": args.questions,
        "tokens": args.tokens,
        "torch": torch.__version__,
        "decode_attention": "cpu-kernel" if SlotModel(m16, 1, 1).kernel is not None else "torch",
    }
    save_result("precision", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
