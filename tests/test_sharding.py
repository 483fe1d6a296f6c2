"""Sharded frozen weights (--shard-weights, fastprompt/sharding.py): CPU processes under torchrun (gloo) end
at the prompt of one process; errors exit 2 with one line."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fastprompt.sharding import check_engine
from fastprompt.train import main

HERE = os.path.dirname(os.path.abspath(__file__))
# 14 examples, batch 7: two batches a epoch, split 3 + 4 over 2 ranks and 2 + 2 + 3 over 3
ARGS = ["--model", "tiny", "--train-size", "14", "--batch-size", "7", "--test-size", "0.002", "--samples", "2",
        "--lr", "1e-2", "--no-progress", "--eval-size", "3"]


def torchrun(n, *args, script=None, env=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           **(env or {})}
    target = [script] if script else ["-m", "fastprompt.train"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *target, *args], capture_output=True, text=True, env=env, timeout=timeout)


def prompt_of(out, tensor="prompt"):
    return load_file(os.path.join(out, "prompt.safetensors"))[tensor]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_refused_without_torchrun_or_with_one_process(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*ARGS, "--shard-weights", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [err.strip()] and "torchrun --nproc_per_node N" in err
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # torchrun, one process
        monkeypatch.setenv(key, value)
    assert main([*ARGS, "--shard-weights", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [err.strip()] and "--nproc_per_node 2 or more" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_engine_shards():
    assert [check_engine(e) for e in ("auto", "naive", "generic", "fused")] == ["auto", "naive", "generic", "fused"]


def worker_rows(n, tmp_path, engines=None):
    """tests/sharded_worker.py on ``n`` processes (``engines``: only the cases of these engines), its rows
    checked: the sharded computation is the unsharded one, and every layer is sharded again after it."""
    env = {"SHARD_TMP": str(tmp_path / str(n)), **({"SHARD_ENGINES": ",".join(engines)} if engines else {})}
    result = torchrun(n, script=os.path.join(HERE, "sharded_worker.py"), timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        assert row["init"] == 0.0, row["case"]
        assert row["freed"], row  # every layer sharded again after each forward and each backward
        assert row["engine"] == (row["case"][1] if row["case"][1] != "auto" else "fused"), row
        assert row["worst"] <= 1e-5, row  # loss and gradient over 3 steps
        assert row["many"] is None or row["many"] <= 1e-5, row  # prompts through loss_terms_many
        if row["gathers"] is not None:  # the fused engine's K prompts: one pass, each layer gathered once
            assert row["gathers"][1] == row["gathers"][0] > 0, row
        assert row["replicated"] <= 1, row  # only the first batch (layout check) ran whole on every rank
        a, b = row["eval"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"] and a["exact_match"] == b["exact_match"], row
    return rows


@pytest.mark.slow
def test_every_engine_path_and_method_matches_one_process(tmp_path):
    """tests/sharded_worker.py: generic (packed, padded, several packs, a field before the prompt), naive,
    relaxed, hard, prefix (generic, naive, after a field), tiny Llama, both loaded from safetensors chunk by
    chunk; the packed engine (soft, prefix, prefix after a field; GPT-2, Llama, Gemma 3; auto); 2 and 3
    processes, batch 7."""
    for n in (2, 3):
        assert len(worker_rows(n, tmp_path)) == 21


def test_the_packed_engine_sharded_matches_one_process_and_gathers_once_for_k_prompts(tmp_path):
    """The worker's packed-engine cases on 2 processes (~20 s; all cases at 2 and 3: the slow test above):
    GPT-2, Llama, Gemma 3, soft and prefix; K prompts in one pass gather each layer once (GCG's candidates)."""
    rows = worker_rows(2, tmp_path, engines=["fused"])
    assert len(rows) == 6 and sum(row["gathers"] is not None for row in rows) == 3


@pytest.mark.slow
def test_cli_three_processes_match_one_and_resume_with_two(tmp_path):
    """3 sharded processes write a checkpoint that 2 sharded processes resume: the prompt and the final test
    loss of an uninterrupted one-process run."""
    single = tmp_path / "single"
    assert main([*ARGS, "--epochs", "2", "--engine", "generic", "--out", str(single)]) == 0
    three = tmp_path / "three"
    result = torchrun(3, *ARGS, "--epochs", "1", "--shard-weights", "--out", str(three))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model tiny on cpu") == 1 and "x 3 processes, weights sharded" in result.stdout
    header = json.loads((three / "metrics.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 3 and header["config"]["shard_weights"] is True
    assert (three / "samples.txt").read_text().count("Predicted:") == 2  # every rank decoded, rank 0 wrote
    result = torchrun(2, *ARGS, "--epochs", "2", "--shard-weights", "--resume", "--out", str(three))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    assert rel(prompt_of(three), prompt_of(single)) <= 1e-5
    lines = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    sharded = [json.loads(line) for line in (three / "metrics.jsonl").read_text().splitlines()]
    final_a, final_b = lines[-1], sharded[-1]
    assert final_b["event"] == "final" and abs(final_a["test_loss"] - final_b["test_loss"]) <= 1e-5 * final_a["test_loss"]


@pytest.mark.slow
def test_cli_fused_two_processes_match_one(tmp_path):
    """--engine fused --shard-weights on 2 processes ends at the one-process fused run's prompt."""
    single = tmp_path / "single"
    assert main([*ARGS, "--epochs", "1", "--engine", "fused", "--out", str(single)]) == 0
    two = tmp_path / "two"
    result = torchrun(2, *ARGS, "--epochs", "1", "--engine", "fused", "--shard-weights", "--out", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused (fp32" in result.stdout and "x 2 processes, weights sharded" in result.stdout
    assert rel(prompt_of(two), prompt_of(single)) <= 1e-5


@pytest.mark.slow
def test_a_failed_rank_is_reported_on_every_rank(tmp_path):
    # rank 1 raises in its third forward: rank 0, waiting in an all-gather, says so in one line (exit 1)
    result = torchrun(2, *ARGS, "--epochs", "1", "--shard-weights", "--out", str(tmp_path / "x"),
                      script=os.path.join(HERE, "sharded_failing_rank.py"), env={"FASTPROMPT_DIST_TIMEOUT": "60"})
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    lost = [line for line in error_lines(result.stderr) if line.startswith("error: rank 0 of 2:")]
    assert len(lost) == 1 and "--resume" in lost[0], result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_read_block_is_the_layer_read_weights_reads(kind):
    """The fused engine on sharded weights reads one layer at a time (families.read_block): the same tensors
    and settings as the whole-model read, layer by layer."""
    import dataclasses

    import torch

    from fastprompt.families import read_block, read_weights
    from fastprompt.sharding import _block_tensors
    from helpers import tiny_causal_lm, tiny_gpt2

    m = tiny_gpt2(n_layer=3) if kind == "gpt2" else tiny_causal_lm(kind)
    whole = read_weights(m)
    for i, block in enumerate(whole.blocks):
        one = read_block(m, i)
        pairs = list(zip(_block_tensors(block), _block_tensors(one)))
        assert pairs and len(pairs) == len(list(_block_tensors(block)))
        for (path_a, a), (path_b, b) in pairs:
            assert path_a == path_b and torch.equal(a, b), (i, path_a)
        assert block.attn.window == one.attn.window and block.attn.scale == one.attn.scale
        assert dataclasses.replace(block.attn, qkv_w=None, qkv_b=None, out_w=None, out_b=None, q_norm=None,
                                   k_norm=None, rotary=None) == \
            dataclasses.replace(one.attn, qkv_w=None, qkv_b=None, out_w=None, out_b=None, q_norm=None,
                                k_norm=None, rotary=None)
