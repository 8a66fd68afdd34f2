"""Data-parallel stages (`ssb.parallel`, `ssb.shards`): the rank split, the shard merge, and `ssb run` under
torchrun with 2 CPU processes (gloo) against 1 process, a rank killed mid-rollout, and a resume at another world
size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssb import parallel
from ssb.cli import main
from ssb.distill.store import TeacherStore, TeacherStoreWriter, stored_ids
from ssb.files import read_jsonl, write_jsonl
from ssb.rundir import RunDir, rank_shard, rank_shards
from ssb.shards import fold

SRC = Path(__file__).parents[1] / "src"


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1)),
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "16"}, (1, 2, 1)),  # torchrun wins
    ],
)
def test_world_from_the_launchers_variables(monkeypatch, env, expected):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    w = parallel.world()
    assert (w.rank, w.size, w.local_rank) == expected


def test_a_rank_outside_the_world_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="rank 2 is outside the world size 2"):
        parallel.world()


def test_without_init_one_process_does_everything(monkeypatch):
    """A library caller with WORLD_SIZE in its environment but no `init` must not silently drop records."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parallel.current().size == 1
    assert parallel.share([f"q{i}" for i in range(50)]) == {f"q{i}" for i in range(50)}


def test_every_record_has_exactly_one_rank_in_equal_numbers_whatever_the_order():
    ids = [f"arith-{i}" for i in range(500)]
    for size in (2, 3, 8):
        worlds = [parallel.World(rank=r, size=size, local_rank=r) for r in range(size)]
        shares = [parallel.share(ids, w) for w in worlds]
        assert set().union(*shares) == set(ids) and sum(map(len, shares)) == len(ids)  # a partition
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert shares == [parallel.share(list(reversed(ids)), w) for w in worlds]  # order-free
    halves = [parallel.share(ids[:32], parallel.World(r, 2, r)) for r in range(2)]
    assert sorted(map(len, halves)) == [16, 16]  # a hash modulo 2 gave 19 and 13 of 32 questions


def test_fold_merges_shards_once_in_input_order(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(path, [{"id": "c", "v": 1}])
    write_jsonl(rank_shard(path, 0, 2), [{"id": "b", "v": 1}, {"id": "c", "v": 2}])  # c twice: the first stays
    shard = rank_shard(path, 1, 2)
    shard.write_text(json.dumps({"id": "a", "v": 1}) + "\n" + '{"id": "d", "v"')  # a rank killed mid-line
    (tmp_path / "rollouts_other.rank-0-of-2.jsonl").write_text('{"id": "x"}\n')  # another file's shard
    assert [p.name for p in rank_shards(path)] == ["rollouts.rank-0-of-2.jsonl", "rollouts.rank-1-of-2.jsonl"]
    assert fold(path, order=["a", "b", "c", "d"]) == 2
    assert read_jsonl(path) == [{"id": "a", "v": 1}, {"id": "b", "v": 1}, {"id": "c", "v": 1}]
    assert rank_shards(path) == [] and (tmp_path / "rollouts_other.rank-0-of-2.jsonl").exists()
    before = path.read_bytes()
    assert fold(path, order=["a", "b", "c", "d"]) == 0 and path.read_bytes() == before


def test_fold_keeps_a_record_without_a_key_for_the_stage_check_to_name(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, [{"id": "b"}, {"text": "no id"}])
    write_jsonl(rank_shard(path, 1, 2), [{"id": "a"}])
    fold(path, order=["a", "b"])
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}, {"text": "no id"}]


def _hidden_writer(root, **kw):
    return TeacherStoreWriter(
        root, temperature=2.0, top_k=0, vocab_size=10, fingerprint="f", kind="hidden", hidden_size=3, **kw
    )


def test_a_ranks_teacher_store_is_absorbed_once_even_after_a_kill_midway(tmp_path):
    main_root, rows = tmp_path / "logits", {f"e{i}": torch.randn(i + 1, 3) for i in range(6)}
    main_store = _hidden_writer(main_root, shard_size=1)
    main_store.add("e0", rows["e0"])
    for r, ids in ((0, ["e1", "e2"]), (1, ["e3", "e4", "e5"])):
        w = _hidden_writer(main_root / f"rank-{r}-of-2", shard_size=2)
        for i in ids:
            w.add(i, rows[i])
        w.close()
    # a kill after the first shard of rank 1 was taken over but before its directory was removed
    assert main_store.absorb(main_root / "rank-0-of-2") == 2
    partial = json.loads((main_root / "rank-1-of-2" / "index.json").read_text())
    main_store.index["shards"].append({**partial["shards"][0], "file": "shard-99999.safetensors"})
    (main_root / "shard-99999.safetensors").write_bytes(
        (main_root / "rank-1-of-2" / "shard-00000.safetensors").read_bytes()
    )
    main_store.done.update(e[0] for e in partial["shards"][0]["examples"])
    assert main_store.absorb(main_root / "rank-1-of-2") == 1  # only the shard not taken yet
    main_store.close()
    assert stored_ids(main_root) == set(rows) and not (main_root / "rank-1-of-2").exists()
    store = TeacherStore(main_root)
    for i, h in rows.items():
        assert torch.allclose(store[i].states, h.half().float())


def test_a_store_with_other_metadata_is_refused(tmp_path):
    main_store = _hidden_writer(tmp_path / "logits")
    other = TeacherStoreWriter(
        tmp_path / "logits" / "rank-1-of-2", temperature=1.0, top_k=0, vocab_size=10, fingerprint="f",
        kind="hidden", hidden_size=3,
    )  # fmt: skip
    other.add("e0", torch.randn(2, 3))
    other.close()
    with pytest.raises(ValueError, match="temperature=1.0 there, 2.0 here"):
        main_store.absorb(tmp_path / "logits" / "rank-1-of-2")


def test_experiment_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["experiment", "whatever.yaml"]) == 2
    assert "run `ssb experiment` in one process" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- launches


def _config(tmp_path: Path, model_dir, n: int, temperature: float, **extra: str) -> Path:
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples and {4 - i} more?", "answer": "4"}) + "\n"
            for i in range(n)
        )
    )
    cfg = tmp_path / extra.get("name", "tiny.yaml")
    lines = [
        f"model: {model_dir}",
        f"data: {{train: {{source: {data}}}}}",
        f"rollout: {{k: 4, max_new_tokens: 16, batch_size: {extra.get('batch', 16)}, temperature: {temperature}}}",
        "teach: {max_new_tokens: 16, batch_size: 8, attempts: 2}",
        "logits: {top_k: 8, batch_size: 4, store: topk, reference_pairs: 2}",
        f"train: {{epochs: 1, batch_size: {extra.get('train_batch', 2)}, lora_r: 4, lora_alpha: 8, save_steps: 2}}",
        f"eval: {{data: {{source: {data}}}, max_new_tokens: 16}}",
        f"baselines: {extra.get('baselines', '[sft]')}",
        "generation_backend: engine",
    ]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _launch(verb: str, cfg: Path, run: RunDir, procs: int, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "SSB_TEST_LAUNCH": str(run.root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd += ["-m", "ssb", verb, "--config", str(cfg), "--run-dir", str(run.root)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _records(path: Path, field: str) -> list[tuple]:
    """(id, sample index, text) for every sample of every record of a JSONL output."""
    return [(r["id"], j, s["text"]) for r in read_jsonl(path) for j, s in enumerate(r[field])]


def test_two_process_run_gives_the_one_process_records(tmp_path, answering_model_dir, capsys):
    """`torchrun --nproc-per-node 2 -m ssb run` against `ssb run`: every stage has the same records (ids x sample
    index), none twice, and at temperature 1 the same texts (each sample's random stream is keyed on seed, prompt
    and sample index, not on the rank or batch); the same teacher logits, and the same greedy eval summaries."""
    cfg = _config(tmp_path, answering_model_dir, n=12, temperature=1.0)
    # DDP trains on each rank's batch: 2 ranks x 1 is the one process's batch of 2 (the same adapter)
    cfg_two = _config(tmp_path, answering_model_dir, n=12, temperature=1.0, train_batch="1", name="two.yaml")
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert main(["run", "--config", str(cfg), "--run-dir", str(one.root)]) == 0
    capsys.readouterr()
    out = _finish(_launch("run", cfg_two, two, 2))
    assert "what this run found" in out and out.count("=== held-out q:") == 1  # rank 0 alone reports
    for name in ("rollout", "teach", "logits", "train", "curate"):
        assert two.stage_entry(name)["status"] == "done"
        assert two.stage_entry(name)["world_size"] == 2
    # rollouts: same (id, sample) set, none twice; the texts equal for nearly all (here: all) samples
    a, b = _records(one.rollouts, "rollouts"), _records(two.rollouts, "rollouts")
    assert len(b) == len({(i, j) for i, j, _ in b}) == 48
    assert {(i, j) for i, j, _ in a} == {(i, j) for i, j, _ in b}
    same = sum(x == y for x, y in zip(sorted(a), sorted(b)))
    assert same >= 0.9 * len(a)
    assert [r["id"] for r in read_jsonl(two.rollouts)] == [f"q{i}" for i in range(12)]  # input order
    if same == len(a):  # identical rollouts: everything downstream is identical too
        assert read_jsonl(one.curated) == read_jsonl(two.curated)
        pa, pb = read_jsonl(one.pairs), read_jsonl(two.pairs)
        assert [p["id"] for p in pa] == [p["id"] for p in pb]  # both in curation order
        assert {p["id"]: p["solution_ids"] for p in pa} == {p["id"]: p["solution_ids"] for p in pb}
        key = lambda r: (r["id"], r["attempt"])  # noqa: E731
        assert list(map(key, read_jsonl(one.teach_attempts))) == list(map(key, read_jsonl(two.teach_attempts)))
        s1, s2 = TeacherStore(one.logits_dir), TeacherStore(two.logits_dir)
        assert len(s1) == len(s2) == len(pa)
        for p in pa:
            assert torch.equal(s1[p["id"]].ids, s2[p["id"]].ids)
            assert torch.allclose(s1[p["id"]].logprobs.float(), s2[p["id"]].logprobs.float(), atol=1e-2)
        assert stored_ids(two.logits_dir / "reference") == stored_ids(one.logits_dir / "reference")
        for tag in ("base", "ssb", "sft"):  # greedy: the same texts and the same summary
            s1 = json.loads((one.eval_dir(tag, "q") / "summary.json").read_text())
            s2 = json.loads((two.eval_dir(tag, "q") / "summary.json").read_text())
            assert {k: s1[k] for k in ("pass@1", "problems", "mean_tokens")} == {
                k: s2[k] for k in ("pass@1", "problems", "mean_tokens")
            }, tag
            samples = [_records(r.eval_dir(tag, "q") / "samples.jsonl", "samples") for r in (one, two)]
            assert samples[0] == samples[1], tag
    for tag in ("base", "ssb", "sft"):
        samples = read_jsonl(two.eval_dir(tag, "q") / "samples.jsonl")
        assert sorted(s["id"] for s in samples) == sorted(f"q{i}" for i in range(12))
    leftovers = [p for p in two.root.rglob("*rank-*-of-*")]
    assert leftovers == []


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the launched worker with this RANK (found through its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SSB_TEST_LAUNCH={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_mid_rollout_resumes_without_loss_or_duplicates(tmp_path, answering_model_dir):
    """SIGKILL rank 1 while it writes its rollouts shard; rerunning the same launch merges what both ranks had
    written and does only the rest: every question once."""
    n = 120
    cfg = _config(tmp_path, answering_model_dir, n=n, temperature=1.0, batch="2")
    run = RunDir(tmp_path / "run")
    proc = _launch("rollout", cfg, run, 2, start_new_session=True)
    shard = rank_shard(run.rollouts, 1, 2)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(shard, repair=False)) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    pid = _rank_pid(str(run.root), 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    written = len(read_jsonl(shard, repair=False)) + len(read_jsonl(rank_shard(run.rollouts, 0, 2), repair=False))
    assert 3 <= written < n  # killed midway
    _finish(_launch("rollout", cfg, run, 2))
    ids = [r["id"] for r in read_jsonl(run.rollouts)]
    assert ids == [f"q{i}" for i in range(n)]
    assert rank_shards(run.rollouts) == []
    assert run.stage_entry("rollout")["counts"]["questions"] == n


def test_a_half_finished_stage_continues_at_another_world_size(tmp_path, answering_model_dir, capsys):
    """Shards left by a killed 3-process launch are folded in by a one-process rerun, which does only the rest."""
    cfg = _config(tmp_path, answering_model_dir, n=9, temperature=1.0)
    full = RunDir(tmp_path / "full")
    assert main(["rollout", "--config", str(cfg), "--run-dir", str(full.root)]) == 0
    records = read_jsonl(full.rollouts)
    run = RunDir(tmp_path / "run")
    assert main(["rollout", "--config", str(cfg), "--run-dir", str(run.root)]) == 0
    write_jsonl(run.rollouts, [])  # as if a 3-process launch had been killed: its shards hold 5 questions
    run.update_stage("rollout", status="running")
    write_jsonl(rank_shard(run.rollouts, 0, 3), records[0:2])
    write_jsonl(rank_shard(run.rollouts, 2, 3), records[4:7])
    capsys.readouterr()
    assert main(["rollout", "--config", str(cfg), "--run-dir", str(run.root)]) == 0
    assert "resuming: 5 of 9 questions already done" in capsys.readouterr().out
    assert read_jsonl(run.rollouts) == records  # same texts: per-sample streams; input order
    assert rank_shards(run.rollouts) == []


def test_grpo_under_two_processes_counts_every_ranks_completions(tmp_path, tiny_model_dir):
    """GRPO through TRL's multi-process support: each rank generates for its own questions (batch_size is per
    process, as in DDP training), and the stage's counts add up the completions of both ranks."""
    data = tmp_path / "q.jsonl"
    write_jsonl(data, [{"id": f"q{i}", "question": f"Tom has {i} apples?", "answer": "4"} for i in range(8)])
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata: {{train: {{source: {data}}}}}\ngeneration_backend: engine\n"
        "train: {lora_r: 4, lora_alpha: 8}\n"
        "grpo: {max_steps: 2, batch_size: 2, num_generations: 2, max_completion_length: 8}\n"
    )
    run = RunDir(tmp_path / "run")
    _finish(_launch("grpo", cfg, run, 2))
    entry = run.stage_entry("grpo")
    assert entry["world_size"] == 2 and entry["counts"]["steps"] == 2
    # 2 ranks x 2 steps x 2 questions x 2 completions of at most 8 tokens
    assert entry["counts"]["completions"] == 16 and 16 <= entry["counts"]["generated_tokens"] <= 128
    # both ranks did work and the stage's CPU seconds are their sum
    ranks = entry["rank_cpu_seconds"]
    assert len(ranks) == 2 and min(ranks) > 0 and entry["cpu_seconds"] == pytest.approx(sum(ranks), abs=0.02)
    assert (run.grpo_adapter / "adapter_config.json").exists()
