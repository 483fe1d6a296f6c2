"""Data parallel training: 2 CPU processes (gloo, torchrun) give the prompt of one process."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fastprompt.distributed import DataParallelEngine
from fastprompt.train import main

# 17 examples, batch 8: batches of 8, 8 and 1 (the last leaves rank 0 an empty shard)
ARGS = ["--model", "tiny", "--epochs", "1", "--train-size", "17", "--batch-size", "8", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]


def test_shards_cover_the_batch_once():
    for n in range(0, 11):
        for world in (1, 2, 3):
            batch = list(range(n))
            shards = [DataParallelEngine(None, r, world).shard(batch) for r in range(world)]
            assert sum(shards, []) == batch


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TORCHRUN = TORCHRUN if os.path.exists(TORCHRUN) else shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")


def two_processes(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "fastprompt.train", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@needs_torchrun
@pytest.mark.parametrize("method,tensor", [("soft", "prompt"), ("prefix", "prefix")])
def test_two_gloo_processes_match_one_process(tmp_path, method, tensor):
    args = [*ARGS, "--method", method]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    multi = tmp_path / "multi"
    result = two_processes([*args, "--out", str(multi), "--checkpoint-every", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(str(single / "prompt.safetensors"))[tensor]
    b = load_file(str(multi / "prompt.safetensors"))[tensor]
    rel = ((a - b).norm() / a.norm()).item()
    assert rel <= 1e-6, rel
    assert result.stdout.count("model tiny on cpu") == 1 and "x 2 processes" in result.stdout  # rank 0 prints
    lines = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["world_size"] == 2 and lines[0]["backend"] == "gloo"
    epochs = [r for r in lines if "epoch" in r and "event" not in r]
    single_epochs = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()
                     if '"train_loss"' in line]
    assert len(epochs) == 1
    assert abs(epochs[0]["train_loss"] - single_epochs[0]["train_loss"]) <= 1e-6 * single_epochs[0]["train_loss"]


@needs_torchrun
def test_a_nan_stop_in_two_processes_is_reported_once(tmp_path):
    args = [*ARGS, "--lr", "1e30", "--train-size", "64", "--out", str(tmp_path / "nan")]
    result = two_processes(args)
    assert result.returncode != 0
    assert result.stderr.count("error: NaN/inf loss or gradient in 3 steps in a row") == 1, result.stderr[-3000:]
    assert "exitcode  : 3" in result.stderr  # the rank that ended first stopped with the NaN code


@needs_torchrun
@pytest.mark.parametrize("sharded", [False, True])
def test_a_sweep_of_two_lengths_in_two_processes_is_one_pass_and_matches_one_process(tmp_path, sharded):
    """Every point of a sweep over two prompt lengths and two learning rates, trained by 2 processes in one
    pass a step (each rank's shards of the 4 prompts' batches, an empty one in the last batch), replicated or
    with sharded weights, ends at the prompt and the final test loss of the same sweep in one process; rank 0
    alone prints and writes the sweep's table. ``--max-steps 2`` stops inside the epoch: the final test loss
    is computed after training (the engines unwrapped, as after a single run: no collective on rank 0 alone)."""
    args = [a for a in ARGS if a not in ("--lr", "1e-2")] + ["--sweep", "lr=1e-2,3e-2", "--sweep", "prompt_len=2,3"]
    i = args.index("--test-size")
    args[i + 1] = "0.002"
    args += ["--max-steps", "2", "--eval-size", "2"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([*args, "--out", str(single)]) == 0
    result = two_processes([*args, "--out", str(multi), *(["--shard-weights"] if sharded else [])])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sweep of 4 prompts of 2 prompt lengths in one pass") == 1
    assert result.stdout.count("| point |") == 1
    assert ("weights sharded" in result.stdout) == sharded
    names = [f"lr-{lr}_prompt_len-{n}" for lr in ("0.01", "0.03") for n in (2, 3)]
    points_a = {p["point"]: p for p in json.loads((single / "sweep.json").read_text())["points"]}
    points_b = {p["point"]: p for p in json.loads((multi / "sweep.json").read_text())["points"]}
    for name in names:
        a = load_file(str(single / name / "prompt.safetensors"))["prompt"]
        b = load_file(str(multi / name / "prompt.safetensors"))["prompt"]
        assert ((a - b).norm() / a.norm()).item() <= 1e-6, name
        assert points_a[name]["steps"] == points_b[name]["steps"] == 2
        assert abs(points_a[name]["test_loss"] - points_b[name]["test_loss"]) <= 1e-6 * points_a[name]["test_loss"]
