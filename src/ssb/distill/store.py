"""Compact storage of teacher distributions over solution tokens, in sharded safetensors files. Four kinds
(docs/teacher-store.md compares them):

- `topk`: per token the top-k ids and log-probabilities at temperature T plus the log of the remaining
  (tail) mass: 4k + 4 bytes per token when the vocabulary fits 16-bit ids (1000 B at k = 249 for SmolLM2's 49,152),
  else 6k + 4 (1000 B at k = 166 for Qwen2.5's 151,936), instead of 4V for a dense fp32 row (192 KiB for SmolLM2).
  The loss sees the teacher as k + 1 buckets (biased: the tail's shape is the student's).
- `sampled` (random-sampling KD, Anshumann et al., arXiv 2503.16870): S tokens drawn with replacement from the
  teacher at T, each with its log-probability: 4S bytes (6S with 32-bit ids). The loss weighs each draw 1/S, an
  unbiased estimate of the teacher (`ssb.distill.loss.SampledTeacher`). Draws are seeded by (seed, example id).
- `hybrid`: the top-k head exactly (as `topk`) plus S draws from the tail, each weighing p_tail / S: 4(k+S) + 4.
- `hidden`: per token the teacher's final hidden state in float16 (2H bytes: 1152 B for SmolLM2). The teacher
  shares the student's frozen output head, so training recomputes the exact full-vocabulary distribution, at any T.

    RUN/logits/index.json              kind, schema version, T, k, vocabulary and hidden size, model + tokenizer
                                       fingerprint, and per shard: its file and [example id, first row, rows]
    RUN/logits/shard-00000.safetensors topk: ids [n, k] (int16 holding id - 32768 when V <= 65536, else int32),
                                       logprobs [n, k] float16, log_tail [n] float32;
                                       sampled: ids, logprobs [n, S]; hybrid: ids, logprobs [n, k + S] (head
                                       first, draws sorted by id), log_tail [n];
                                       hidden: hidden [n, H] float16 (n = the shard's solution tokens)

Schema versions: 3 added the kinds sampled and hybrid (index keys `samples`, `seed`); version 2 stores (topk and
hidden, identical layout) are still read.

A shard is written to a temporary file and renamed, then the index is rewritten the same way, so a killed run
keeps every finished shard and resumes with the examples not yet stored. Readers check the metadata against what
they expect (temperature, vocabulary, model fingerprint) and refuse a mismatch with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ssb.distill.loss import DenseTeacher, SampledTeacher, SparseTeacher, _compute_dtype
from ssb.files import atomic_write_bytes, atomic_write_json

SCHEMA_VERSION = 3  # 2: 16-bit ids for vocabularies up to 65,536; 3: kinds sampled and hybrid
READABLE_VERSIONS = (2, 3)  # version 2 = version 3 without the sampled kinds
FORMAT = "ssb-sparse-teacher-logits"
INDEX = "index.json"
DTYPES = {"ids": torch.int32, "logprobs": torch.float16, "log_tail": torch.float32}  # kind topk
HIDDEN_DTYPE = torch.float16  # kind hidden
KINDS = ("topk", "sampled", "hybrid", "hidden")
# what two stores must share to be one (a resumed store, or a rank's share merged into the main one)
META_KEYS = ("schema_version", "kind", "temperature", "top_k", "samples", "seed", "vocab_size", "hidden_size")
META_KEYS += ("fingerprint",)
TENSORS = {
    "topk": ("ids", "logprobs", "log_tail"),
    "sampled": ("ids", "logprobs"),
    "hybrid": ("ids", "logprobs", "log_tail"),
}
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


class DrawnRows(NamedTuple):
    """What the writer stores for kinds sampled and hybrid, per token: head ids then drawn ids."""

    ids: Tensor  # [C, k + S] int64: the top-k head (k = 0 for sampled), then S ids drawn from the rest, sorted
    logprobs: Tensor  # [C, k + S] float: the teacher's log-probability of each at T
    log_tail: Tensor  # [C] float: log of the mass outside the head (0 for sampled)


def example_generator(seed: int, example_id: str) -> torch.Generator:
    """A CPU generator seeded by (run seed, example id): reruns, resumes and batch orders draw the same tokens."""
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def draw(logits: Tensor, temperature: float, samples: int, head: int, generator: torch.Generator) -> DrawnRows:
    """[C, V] teacher logits -> the top-`head` ids and S = `samples` ids drawn with replacement from the teacher
    at T restricted to the rest of the vocabulary (all of it when head = 0), by inverse CDF at uniforms from
    `generator` (CPU, so the draws do not depend on the device)."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)  # [C, V]
    c, v = logp.shape
    head = min(head, v)
    top, top_ids = logp.topk(head, dim=-1)  # [C, k]
    rest = logp.exp().scatter(1, top_ids, 0.0).double()  # [C, V] the tail, unnormalised
    log_tail = rest.sum(-1).log().to(logp.dtype) if head else logp.new_zeros(c)  # [C]
    cdf = rest.cumsum_(-1)  # [C, V] in float64: 49k float32 terms would drift by ~1e-4
    u = torch.rand(c, samples, generator=generator, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]  # [C, S]
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=v - 1).sort(-1).values  # [C, S]; zero-mass ids never
    return DrawnRows(torch.cat([top_ids, drawn], -1), torch.cat([top, logp.gather(1, drawn)], -1), log_tail)


def estimate(rows: DrawnRows | SparseTeacher, head: int) -> SampledTeacher:
    """Stored head + draws -> the loss's unbiased estimate: head tokens weigh their probability, each of the S
    draws p_tail / S (1 / S without a head). The stored (fp16) head and tail are renormalised to sum to one."""
    cd = _compute_dtype(rows.logprobs)
    ids, lp, log_tail = rows.ids, rows.logprobs.to(cd), rows.log_tail.to(cd)
    n_draws = ids.shape[1] - head
    mass = torch.softmax(torch.cat([lp[:, :head], log_tail[:, None]], -1), -1)  # [C, k + 1]
    weights = torch.cat([mass[:, :head], (mass[:, head:] / max(1, n_draws)).expand(-1, n_draws)], -1)  # [C, k + S]
    return SampledTeacher(ids, weights, lp)


def id_dtype(vocab_size: int) -> torch.dtype:
    """int16 (offset by 32768) when every id fits in 16 bits, else int32."""
    return torch.int16 if vocab_size <= 2 * ID16_OFFSET else torch.int32


def bytes_per_token(k: int, kind: str = "topk", hidden_size: int = 0, vocab_size: int = 2**31, samples: int = 0) -> int:
    """Payload bytes per stored token (shard headers add a few hundred bytes per shard); k = the head size.

    >>> bytes_per_token(249, vocab_size=49152), bytes_per_token(166, vocab_size=151936)
    (1000, 1000)
    >>> bytes_per_token(0, "sampled", vocab_size=49152, samples=250), bytes_per_token(124, "hybrid", 0, 49152, 125)
    (1000, 1000)
    """
    if kind == "hidden":
        return hidden_size * torch.empty((), dtype=HIDDEN_DTYPE).element_size()
    size = {**DTYPES, "ids": id_dtype(vocab_size)}
    width = k + samples
    return sum(torch.empty((), dtype=size[n]).element_size() * (width if n != "log_tail" else 1) for n in TENSORS[kind])


def auto_top_k(vocab_size: int, budget: int = MAX_BYTES_PER_TOKEN) -> int:
    """The largest k whose rows fit `budget` bytes per token (more k = truer gradients; benchmarks/README.md).

    >>> auto_top_k(49152), auto_top_k(151936)
    (249, 166)
    """
    return auto_slots(vocab_size, "topk", budget)


def auto_slots(vocab_size: int, kind: str, budget: int = MAX_BYTES_PER_TOKEN) -> int:
    """The most ids per token (head + draws) whose rows fit `budget` bytes with this kind.

    >>> auto_slots(49152, "sampled"), auto_slots(49152, "hybrid"), auto_slots(151936, "sampled")
    (250, 249, 166)
    """
    fixed = bytes_per_token(0, kind, vocab_size=vocab_size)
    per_id = bytes_per_token(1, kind, vocab_size=vocab_size) - fixed
    return (budget - fixed) // per_id if kind != "topk" else min(vocab_size, (budget - fixed) // per_id)


def _meta(
    kind: str,
    temperature: float,
    top_k: int,
    vocab_size: int,
    hidden_size: int,
    fingerprint: str,
    model: str,
    samples: int,
    seed: int | None,
) -> dict:
    if kind not in KINDS:
        raise ValueError(f"teacher store kind must be one of {KINDS}, got {kind!r}")
    drawn = kind in ("sampled", "hybrid")
    if drawn and samples < 1:
        raise ValueError(f"teacher store kind {kind!r} needs samples >= 1, got {samples}")
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "temperature": float(temperature),
        "top_k": int(top_k) if kind in ("topk", "hybrid") else 0,  # the exact head
        "samples": int(samples) if drawn else 0,  # draws per token
        "seed": int(seed or 0) if drawn else None,
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
        samples: int = 0,
        seed: int | None = None,
    ):
        self.root = Path(root)
        self.shard_size = shard_size
        meta = _meta(kind, temperature, top_k, vocab_size, hidden_size, fingerprint, model, samples, seed)
        index_path = self.root / INDEX
        if index_path.exists():
            if not resume:
                raise TeacherStoreError(f"{self.root}: already holds teacher logits; use --force to recompute them")
            self.index = _read_index(self.root)
            for key in META_KEYS:
                if self.index.get(key) != meta[key]:
                    raise TeacherStoreError(
                        f"{index_path}: cannot resume: stored {key}={self.index.get(key)!r}, now {meta[key]!r}; "
                        f"rerun the logits stage with --force"
                    )
            self.index["complete"] = False
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.index = {**meta, "complete": False, "shards": []}
        self.done = {e[0] for s in self.index["shards"] for e in s["examples"]}
        self._buf: list[tuple[str, dict[str, Tensor]]] = []
        self.kind, self.hidden_size = kind, int(hidden_size)
        self.width = meta["top_k"] + meta["samples"]  # ids per token
        self.dtypes = {**DTYPES, "ids": id_dtype(vocab_size)}

    def add(self, example_id: str, rows: SparseTeacher | DrawnRows | Tensor) -> None:
        """Store one example: kind topk, a SparseTeacher of [L, k] ids and log-probs and [L] log tail; kinds
        sampled and hybrid, DrawnRows ([L, k + S], [L, k + S], [L]); kind hidden, the [L, H] final hidden states."""
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
            if rows.ids.shape[1] != self.width:
                raise ValueError(f"{example_id}: {rows.ids.shape[1]} ids per token, the store keeps {self.width}")
            stored = {n: getattr(rows, n).detach().to("cpu") for n in TENSORS[self.kind]}
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

    def absorb(self, root: str | Path) -> int:
        """Take over the shards of the store at `root` (a rank's share of a multi-process logits pass, with the
        same metadata), then delete it; the number of examples added. Each shard is copied in and the index
        rewritten before the next, so a kill midway leaves a state the next call completes: a shard whose examples
        are all here already is skipped, and a copy the index does not list yet is overwritten."""
        import shutil

        root = Path(root)
        if not (root / INDEX).exists():  # killed before its first shard: nothing to take
            shutil.rmtree(root, ignore_errors=True)
            return 0
        other = _read_index(root)
        for key in META_KEYS:
            if other.get(key) != self.index.get(key):
                raise TeacherStoreError(
                    f"{root / INDEX}: cannot merge into {self.root}: {key}={other.get(key)!r} there, "
                    f"{self.index.get(key)!r} here; rerun the logits stage with --force"
                )
        self.flush()
        added = 0
        for shard in other["shards"]:
            ids = [e[0] for e in shard["examples"]]
            if all(i in self.done for i in ids):
                continue
            if any(i in self.done for i in ids):
                raise TeacherStoreError(f"{root / shard['file']}: holds examples already in {self.root}")
            name = f"shard-{len(self.index['shards']):05d}.safetensors"
            atomic_write_bytes(self.root / name, (root / shard["file"]).read_bytes())
            self.index["shards"].append({**shard, "file": name})
            atomic_write_json(self.root / INDEX, self.index)
            self.done.update(ids)
            added += len(ids)
        shutil.rmtree(root)
        return added

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


def stored_ids(root: str | Path) -> set[str]:
    """The example ids a (possibly unfinished) store at `root` holds; empty when it has no index yet."""
    root = Path(root)
    if not (root / INDEX).exists():
        return set()
    return {e[0] for s in _read_index(root)["shards"] for e in s["examples"]}


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
    if index.get("schema_version") not in READABLE_VERSIONS:
        raise TeacherStoreError(
            f"{path}: schema version {index.get('schema_version')}, this ssb reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; rerun `ssb logits --force`"
        )
    index.setdefault("samples", 0)  # version 2 had no drawn kinds
    index.setdefault("seed", None)
    return index


class TeacherStore:
    """Random access to stored teacher rows: `store[example_id]` -> SparseTeacher ([L, k] and [L] tensors) for
    kind topk, SampledTeacher ([L, k + S] tensors) for sampled and hybrid, DenseTeacher ([L, H] float32 hidden
    states) for kind hidden."""

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
    samples = property(lambda self: self.index["samples"])
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

    def __getitem__(self, example_id: str) -> SparseTeacher | SampledTeacher | DenseTeacher:
        if example_id not in self._where:
            raise TeacherStoreError(
                f"{self.root}: no teacher logits for example {example_id!r}; rerun `ssb logits` (pairs changed since?)"
            )
        shard, start, n = self._where[example_id]
        f = self._shard(shard)
        if self.kind == "hidden":
            return DenseTeacher(f.get_slice("hidden")[start : start + n].float())
        rows = [f.get_slice(name)[start : start + n] for name in TENSORS[self.kind]]
        ids = rows[0].long() + (ID16_OFFSET if rows[0].dtype == torch.int16 else 0)
        if self.kind == "topk":
            return SparseTeacher(ids, rows[1].float(), rows[2].float())
        log_tail = rows[2].float() if self.kind == "hybrid" else torch.zeros(n)
        return estimate(DrawnRows(ids, rows[1].float(), log_tail), self.top_k)

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
