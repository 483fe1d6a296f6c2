"""--precision auto (the default): bf16 on CUDA (the naive engine: the post's autocast), fp32 on the CPU."""
import torch

import fastprompt as fp
from fastprompt.engines.base import resolve_precision
from fastprompt.train import build_parser, main
from helpers import tiny_gpt2, tokenizer


def test_resolve_precision():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", "cpu", "naive") == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0), "fused") == "bf16"  # no device is touched
    assert resolve_precision("auto", "cuda", "auto") == "bf16"
    assert resolve_precision("auto", "cuda", "naive") == "autocast"
    for explicit in ("fp32", "bf16", "autocast"):
        assert resolve_precision(explicit, "cuda") == explicit == resolve_precision(explicit, "cpu")


def test_auto_is_fp32_on_cpu_and_the_cli_default():
    assert build_parser().parse_args([]).precision == "auto"
    assert "auto" in build_parser().format_help()
    for engine in ("naive", "fused", "generic"):
        tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), prompt_len=2, engine=engine, precision="auto")
        assert tuner.precision == tuner.engine.precision == "fp32", engine
        assert "(fp32" in tuner.engine.describe()


def test_first_line_of_a_run_says_which_precision(tmp_path, capsys):
    code = main(["--model", "tiny", "--epochs", "1", "--train-size", "8", "--test-size", "0.01",
                 "--out", str(tmp_path / "run"), "--no-progress", "--samples", "1"])
    assert code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "(fp32" in first and "precision auto: fp32" in first, first
