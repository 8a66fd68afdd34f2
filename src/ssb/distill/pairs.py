"""Training pairs as token ids, and the batches the teacher-logits stage and the distillation trainer consume.

A pair (RUN/pairs.jsonl) gives the teacher and student chat messages and the teacher's `solution_ids`. The prompt
is rendered with the chat template exactly as the generation engine rendered it when the solution was sampled,
and the solution ids are appended as they are (never re-tokenised), so

    teacher input = prompt_ids(teacher_messages) + solution_ids
    student input = prompt_ids(student_messages) + solution_ids

and the distribution over solution token j is read at position prompt_len - 1 + j on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ssb.distill.loss import SampledTeacher, SparseTeacher


@dataclass
class Pair:
    id: str
    solution_ids: list[int]
    student_prompt: list[int]
    teacher_prompt: list[int]

    @property
    def solution_len(self) -> int:
        return len(self.solution_ids)

    @property
    def student_len(self) -> int:
        return len(self.student_prompt) + len(self.solution_ids)

    @property
    def teacher_len(self) -> int:
        return len(self.teacher_prompt) + len(self.solution_ids)


def _check_messages(path: Path, line: int, field: str, value) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}:{line}: field '{field}': expected a non-empty list of chat messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{path}:{line}: field '{field}[{j}]': expected {{'role': str, 'content': str}}")


def read_pairs(path: str | Path, vocab_size: int | None = None) -> list[dict]:
    """Read and validate RUN/pairs.jsonl; errors name the file, line and field. Read-only: a torn last line (a
    killed teach stage) is reported and skipped, and the teach stage redoes that pair when it resumes."""
    from ssb.files import read_jsonl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `ssb teach` first")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a JSONL file")
    records, seen = [], {}
    for i, r in read_jsonl(path, repair=False, lines=True):
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        if not isinstance(r.get("id"), str) or not r["id"].strip():
            raise ValueError(f"{path}:{i}: field 'id': expected a non-empty string")
        if r["id"] in seen:
            raise ValueError(f"{path}:{i}: field 'id': {r['id']!r} already used on line {seen[r['id']]}")
        seen[r["id"]] = i
        for field in ("teacher_messages", "student_messages"):
            _check_messages(path, i, field, r.get(field))
        ids = r.get("solution_ids")
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise ValueError(f"{path}:{i}: field 'solution_ids': expected a non-empty list of token ids")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(
                f"{path}:{i}: field 'solution_ids': id {max(ids)} is outside the model's vocabulary "
                f"({vocab_size}); the pairs come from another model"
            )
        r["_line"] = i
        records.append(r)
    return records


def encode_pairs(records: list[dict], tokenizer, *, teacher: bool = True, student: bool = True) -> list[Pair]:
    """Token ids of each pair's prompts (rendered like the generation engine renders them) + solution."""
    from ssb.engine.engine import tokenize_prompts

    t = tokenize_prompts(tokenizer, [r["teacher_messages"] for r in records]) if teacher else [[]] * len(records)
    s = tokenize_prompts(tokenizer, [r["student_messages"] for r in records]) if student else [[]] * len(records)
    return [Pair(r["id"], list(r["solution_ids"]), sp, tp) for r, sp, tp in zip(records, s, t)]


def pad_batch(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids [B, S], attention mask [B, S], and targets [B, S]: at position p the id that position p
    predicts when p is a solution position (prompt_len - 1 <= p < len - 1), else -100."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    shift = torch.full((len(seqs), width), -100, dtype=torch.long)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        row = torch.tensor(s, dtype=torch.long)
        ids[b, : len(s)] = row
        mask[b, : len(s)] = 1
        shift[b, p - 1 : len(s) - 1] = row[p:]
    return {"input_ids": ids, "attention_mask": mask, "shift_labels": shift}


class DistillCollator:
    """Pairs -> a student batch (+ teacher rows). Keys:

    input_ids, attention_mask [B, S]; labels [B, S] (solution ids in place, -100 elsewhere: what the Trainer
    counts), shift_labels [B, S] (what each position predicts); with a top-k store, t_ids / t_logprobs [N, k] and
    t_log_tail [N] for the N solution tokens in batch-major order (a sampled or hybrid store: t_ids / t_weights /
    t_logprobs [N, k + S]; a hidden-state store: t_hidden [N, H]); online,
    t_input_ids, t_attention_mask and t_shift_labels [B, S'] for the teacher's own forward pass.
    """

    def __init__(self, pad_id: int, store=None, online: bool = False):
        self.pad_id, self.store, self.online = pad_id, store, online

    def __call__(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        batch = pad_batch(
            [p.student_prompt + p.solution_ids for p in pairs], [len(p.student_prompt) for p in pairs], self.pad_id
        )
        labels = torch.full_like(batch["shift_labels"], -100)
        labels[:, 1:] = batch["shift_labels"][:, :-1]
        batch["labels"] = labels
        if self.store is not None:
            rows = [self.store[p.id] for p in pairs]
            for p, r in zip(pairs, rows):
                if r[0].shape[0] != p.solution_len:
                    raise ValueError(
                        f"teacher logits for {p.id!r} cover {r[0].shape[0]} tokens, the solution has "
                        f"{p.solution_len}; rerun `ssb logits --force`"
                    )
            if isinstance(rows[0], SparseTeacher):
                t = SparseTeacher(*(torch.cat(parts) for parts in zip(*rows)))
                batch.update(t_ids=t.ids, t_logprobs=t.logprobs, t_log_tail=t.log_tail)
            elif isinstance(rows[0], SampledTeacher):
                t = SampledTeacher(*(torch.cat(parts) for parts in zip(*rows)))
                batch.update(t_ids=t.ids, t_weights=t.weights, t_logprobs=t.logprobs)
            else:
                batch["t_hidden"] = torch.cat([r.states for r in rows])
        if self.online:
            tb = pad_batch(
                [p.teacher_prompt + p.solution_ids for p in pairs], [len(p.teacher_prompt) for p in pairs], self.pad_id
            )
            batch.update(
                t_input_ids=tb["input_ids"], t_attention_mask=tb["attention_mask"], t_shift_labels=tb["shift_labels"]
            )
        return batch


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]
