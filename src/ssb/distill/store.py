"""Compact storage of teacher distributions over solution tokens, in sharded safetensors files. Two kinds:

- `topk` (default): per token the top-k ids and log-probabilities at temperature T plus the log of the remaining
  (tail) mass: 4k + 4 bytes per token when the vocabulary fits 16-bit ids (1000 B at k = 249 for SmolLM2's 49,152),
  else 6k + 4 (1000 B at k = 166 for Qwen2.5's 151,936), instead of 4V for a dense fp32 row (192 KiB for SmolLM2).
  The loss sees the teacher as k + 1 buckets (approximate: the tail's shape is the student's).
- `hidden`: per token the teacher's final hidden state in float16 (2H bytes: 1152 B for SmolLM2). The teacher
  shares the student's frozen output head, so training recomputes the exact full-vocabulary distribution, at any T.

    RUN/logits/index.json              kind, schema version, T, k, vocabulary and hidden size, model + tokenizer
                                       fingerprint, and per shard: its file and [example id, first row, rows]
    RUN/logits/shard-00000.safetensors topk: ids [n, k] (int16 holding id - 32768 when V <= 65536, else int32),
                                       logprobs [n, k] float16, log_tail [n] float32;
                                       hidden: hidden [n, H] float16 (n = the shard's solution tokens)

A shard is written to a temporary file and renamed, then the index is rewritten the same way, so a killed run
keeps every finished shard and resumes with the examples not yet stored. Readers check the metadata against what
they expect (temperature, vocabulary, model fingerprint) and refuse a mismatch with a message saying what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ssb.distill.loss import DenseTeacher, SparseTeacher, _compute_dtype
from ssb.files import atomic_write_bytes, atomic_write_json

SCHEMA_VERSION = 2  # 2: 16-bit ids for vocabularies up to 65,536
FORMAT = "ssb-sparse-teacher-logits"
INDEX = "index.json"
DTYPES = {"ids": torch.int32, "logprobs": torch.float16, "log_tail": torch.float32}  # kind topk
HIDDEN_DTYPE = torch.float16  # kind hidden
KINDS = ("topk", "hidden")
ID16_OFFSET = 32768  # int16 ids are stored as id - 32768, so 0..65535 fit
MAX_BYTES_PER_TOKEN = 1000  # the budget `auto_top_k` fills: 1 KB in either unit, shard headers included


class TeacherStoreError(ValueError):
    """Missing, incomplete or mismatched teacher logits; the message says which and how to fix it."""


@torch.no_grad()
def sparsify(logits: Tensor, k: int, temperature: float) -> SparseTeacher:
    """[C, V] teacher logits -> top-k ids [C, k], their log-probs at T [C, k], and the log tail mass [C]."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)  # [C, V]
    k = min(k, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)  # [C, k]
    # Summing the tail directly (not 1 - sum(top)) keeps it accurate when it is tiny.
    log_tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)  # [C]
    return SparseTeacher(ids, top, log_tail)


def id_dtype(vocab_size: int) -> torch.dtype:
    """int16 (offset by 32768) when every id fits in 16 bits, else int32."""
    return torch.int16 if vocab_size <= 2 * ID16_OFFSET else torch.int32


def bytes_per_token(k: int, kind: str = "topk", hidden_size: int = 0, vocab_size: int = 2**31) -> int:
    """Payload bytes per stored token (shard headers add a few hundred bytes per shard).

    >>> bytes_per_token(249, vocab_size=49152), bytes_per_token(166, vocab_size=151936)
    (1000, 1000)
    """
    if kind == "hidden":
        return hidden_size * torch.empty((), dtype=HIDDEN_DTYPE).element_size()
    size = {**DTYPES, "ids": id_dtype(vocab_size)}
    return sum(torch.empty((), dtype=d).element_size() * (k if n != "log_tail" else 1) for n, d in size.items())


def auto_top_k(vocab_size: int, budget: int = MAX_BYTES_PER_TOKEN) -> int:
    """The largest k whose rows fit `budget` bytes per token (more k = truer gradients; benchmarks/README.md).

    >>> auto_top_k(49152), auto_top_k(151936)
    (249, 166)
    """
    per_id = bytes_per_token(1, vocab_size=vocab_size) - bytes_per_token(0, vocab_size=vocab_size)
    return min(vocab_size, (budget - bytes_per_token(0, vocab_size=vocab_size)) // per_id)


def _meta(
    kind: str, temperature: float, top_k: int, vocab_size: int, hidden_size: int, fingerprint: str, model: str
) -> dict:
    if kind not in KINDS:
        raise ValueError(f"teacher store kind must be one of {KINDS}, got {kind!r}")
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "temperature": float(temperature),
        "top_k": int(top_k) if kind == "topk" else 0,
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "fingerprint": fingerprint,
        "model": model,
    }


class TeacherStoreWriter:
    """Buffers examples and writes a shard every `shard_size` examples. With `resume`, an existing index with the
    same metadata is continued (`done` lists the stored example ids); otherwise the directory must be empty."""

    def __init__(
        self,
        root: str | Path,
        *,
        temperature: float,
        top_k: int,
        vocab_size: int,
        fingerprint: str,
        model: str = "",
        shard_size: int = 256,
        resume: bool = False,
        kind: str = "topk",
        hidden_size: int = 0,
    ):
        self.root = Path(root)
        self.shard_size = shard_size
        meta = _meta(kind, temperature, top_k, vocab_size, hidden_size, fingerprint, model)
        index_path = self.root / INDEX
        if index_path.exists():
            if not resume:
                raise TeacherStoreError(f"{self.root}: already holds teacher logits; use --force to recompute them")
            self.index = _read_index(self.root)
            for key in ("schema_version", "kind", "temperature", "top_k", "vocab_size", "hidden_size", "fingerprint"):
                if self.index[key] != meta[key]:
                    raise TeacherStoreError(
                        f"{index_path}: cannot resume: stored {key}={self.index[key]!r}, now {meta[key]!r}; "
                        f"rerun the logits stage with --force"
                    )
            self.index["complete"] = False
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.index = {**meta, "complete": False, "shards": []}
        self.done = {e[0] for s in self.index["shards"] for e in s["examples"]}
        self._buf: list[tuple[str, dict[str, Tensor]]] = []
        self.kind, self.top_k, self.hidden_size = kind, int(top_k), int(hidden_size)
        self.dtypes = {**DTYPES, "ids": id_dtype(vocab_size)}

    def add(self, example_id: str, rows: SparseTeacher | Tensor) -> None:
        """Store one example: kind topk, a SparseTeacher of [L, k] ids and log-probs and [L] log tail; kind hidden,
        the [L, H] final hidden states."""
        if example_id in self.done or any(e == example_id for e, _ in self._buf):
            raise TeacherStoreError(f"example id {example_id!r} is stored twice")
        if self.kind == "hidden":
            if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[1] != self.hidden_size:
                raise ValueError(f"{example_id}: expected hidden states [L, {self.hidden_size}]")
            h = rows.detach().to("cpu", HIDDEN_DTYPE)
            if not torch.isfinite(h).all():
                raise ValueError(f"{example_id}: hidden states overflow float16; use logits.store=topk")
            self._buf.append((example_id, {"hidden": h}))
        else:
            if rows.ids.ndim != 2 or rows.ids.shape != rows.logprobs.shape or rows.log_tail.shape != rows.ids.shape[:1]:
                raise ValueError(
                    f"{example_id}: expected ids/logprobs [L, k] and log_tail [L], got "
                    f"{tuple(rows.ids.shape)}, {tuple(rows.logprobs.shape)}, {tuple(rows.log_tail.shape)}"
                )
            if rows.ids.shape[1] != self.top_k:
                raise ValueError(f"{example_id}: {rows.ids.shape[1]} ids per token, the store keeps {self.top_k}")
            stored = {n: getattr(rows, n).detach().to("cpu") for n in DTYPES}
            if self.dtypes["ids"] == torch.int16:
                stored["ids"] = stored["ids"].long() - ID16_OFFSET
            self._buf.append((example_id, {n: t.to(self.dtypes[n]) for n, t in stored.items()}))
        if len(self._buf) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        from safetensors.torch import save

        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        examples, row = [], 0
        for eid, r in self._buf:
            n = int(next(iter(r.values())).shape[0])
            examples.append([eid, row, n])
            row += n
        tensors = {name: torch.cat([r[name] for _, r in self._buf]).contiguous() for name in self._buf[0][1]}
        meta = {k: str(v) for k, v in self.index.items() if k not in ("shards", "complete")}
        data = save(tensors, metadata=meta)
        atomic_write_bytes(self.root / name, data)
        self.index["shards"].append({"file": name, "tokens": row, "bytes": len(data), "examples": examples})
        atomic_write_json(self.root / INDEX, self.index)
        self.done.update(e for e, _ in self._buf)
        self._buf = []

    def close(self) -> dict:
        """Write what is buffered and mark the store complete. Returns counts for the manifest."""
        self.flush()
        self.index["complete"] = True
        atomic_write_json(self.root / INDEX, self.index)
        tokens = sum(s["tokens"] for s in self.index["shards"])
        size = sum(s["bytes"] for s in self.index["shards"])
        return {
            "examples": len(self.done),
            "tokens": tokens,
            "bytes": size,
            "shards": len(self.index["shards"]),
            "bytes_per_token": round(size / max(1, tokens), 1),
        }


def _read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.exists():
        raise TeacherStoreError(f"no teacher logits at {root} (missing {INDEX}); run `ssb logits` first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TeacherStoreError(f"{path}: corrupted (not valid JSON); rerun `ssb logits --force`") from None
    if index.get("format") != FORMAT:
        raise TeacherStoreError(f"{path}: not an ssb teacher-logits index")
    if index.get("schema_version") != SCHEMA_VERSION:
        raise TeacherStoreError(
            f"{path}: schema version {index.get('schema_version')}, this ssb reads version "
            f"{SCHEMA_VERSION}; rerun `ssb logits --force`"
        )
    return index


class TeacherStore:
    """Random access to stored teacher rows: `store[example_id]` -> SparseTeacher ([L, k] and [L] tensors) for
    kind topk, DenseTeacher ([L, H] float32 hidden states) for kind hidden."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = _read_index(self.root)
        if not self.index.get("complete"):
            raise TeacherStoreError(f"{self.root}: the logits stage did not finish; rerun `ssb logits` to complete it")
        self._where = {e[0]: (i, e[1], e[2]) for i, s in enumerate(self.index["shards"]) for e in s["examples"]}
        self._open: dict[int, object] = {}

    kind = property(lambda self: self.index["kind"])
    temperature = property(lambda self: self.index["temperature"])
    top_k = property(lambda self: self.index["top_k"])
    vocab_size = property(lambda self: self.index["vocab_size"])
    fingerprint = property(lambda self: self.index["fingerprint"])

    def check(self, *, temperature: float, vocab_size: int, fingerprint: str | None = None) -> None:
        """Refuse logits computed at another temperature, for another vocabulary, or by another model/tokenizer."""
        where = self.root / INDEX
        if self.kind == "topk" and abs(self.temperature - temperature) > 1e-9:  # hidden states hold any T
            raise TeacherStoreError(
                f"{where}: teacher logits were computed at temperature {self.temperature}, training uses "
                f"train.temperature={temperature}; rerun `ssb logits --force` (or train at T={self.temperature})"
            )
        if self.vocab_size != vocab_size:
            raise TeacherStoreError(
                f"{where}: teacher vocabulary has {self.vocab_size} entries, the student's "
                f"output head {vocab_size}; the logits belong to another model"
            )
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise TeacherStoreError(
                f"{where}: teacher logits come from another model or tokenizer (fingerprint {self.fingerprint}, "
                f"model {self.index.get('model')!r}); the student's base has fingerprint {fingerprint}. "
                f"Rerun `ssb logits --force` with this model"
            )

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def length(self, example_id: str) -> int:
        return self._where[example_id][2]

    def __getitem__(self, example_id: str) -> SparseTeacher:
        if example_id not in self._where:
            raise TeacherStoreError(
                f"{self.root}: no teacher logits for example {example_id!r}; rerun `ssb logits` (pairs changed since?)"
            )
        shard, start, n = self._where[example_id]
        f = self._shard(shard)
        if self.kind == "hidden":
            return DenseTeacher(f.get_slice("hidden")[start : start + n].float())
        rows = [f.get_slice(name)[start : start + n] for name in DTYPES]
        ids = rows[0].long() + (ID16_OFFSET if rows[0].dtype == torch.int16 else 0)
        return SparseTeacher(ids, rows[1].float(), rows[2].float())

    def _shard(self, i: int):
        if i not in self._open:
            from safetensors import safe_open

            path = self.root / self.index["shards"][i]["file"]
            if not path.exists():
                raise TeacherStoreError(f"{path}: missing shard; rerun `ssb logits --force`")
            f = safe_open(str(path), framework="pt")
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint or meta.get("temperature") != str(self.temperature):
                raise TeacherStoreError(f"{path}: shard metadata does not match {self.root / INDEX}")
            self._open[i] = f
        return self._open[i]

    def __getstate__(self) -> dict:  # open safetensors handles do not pickle (dataloader workers)
        return {**self.__dict__, "_open": {}}
