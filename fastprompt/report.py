"""What the CLI reports after training (``final`` line of metrics.jsonl, ``hard_prompt.txt``): the test
metrics of the trained prompt, its token readout, and for a relaxed prompt its argmax tokens as a hard prompt."""
from __future__ import annotations

import os
from typing import Any

import torch

from .methods.relaxed import RelaxedMethod
from .models import embedding_table
from .outputs import write_text
from .tuner import PromptTuner


@torch.no_grad()
def final_report(tuner, test, eval_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """What the CLI reports after training: the method's test metrics (loss on every test example, generation
    metrics on at most ``eval_size``), its token readout, and for a relaxed prompt the metrics of its argmax
    tokens used as a hard prompt."""
    report: dict[str, Any] = {"event": "final", "method": tuner.method.name}
    if test:
        metrics = tuner.evaluate(test, generation_size=eval_size, progress=progress)
        report.update({f"test_{k}": v for k, v in metrics.items()})
        report["eval_size"] = min(len(test), eval_size or len(test))
    ids = tuner.method.token_ids(tuner.prompt)
    if ids is not None:
        report["token_ids"] = ids
        report["token_text"] = tuner.tokenizer.decode(ids)
    if isinstance(tuner.method, RelaxedMethod) and test:
        hard = hard_prompt_metrics(tuner, ids, test, eval_size, progress)
        report.update({f"argmax_test_{k}": v for k, v in hard.items()})
    return report


def hard_prompt_metrics(tuner, ids: list[int], test, eval_size: int | None = None,
                        progress: bool = False) -> dict[str, float]:
    """Test metrics of the token sequence ``ids`` as the prompt (soft tuner on the vocabulary rows)."""
    rows = embedding_table(tuner.model).detach().float()[torch.tensor(ids, device=tuner.device)]
    engine = tuner.engine.name if tuner.engine.name in ("naive", "generic", "fused") else "auto"
    probe = PromptTuner(tuner.model, tuner.tokenizer, tuner.template, tuner.prompt_len, engine=engine,
                        precision=tuner.precision, prompt=rows)
    return probe.evaluate(test, generation_size=eval_size, progress=progress)


def write_outputs(out: str, tuner, test, eval_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """``hard_prompt.txt`` for methods with a token readout; returns ``final_report``."""
    report = final_report(tuner, test, eval_size, progress)
    if "token_ids" in report:
        lines = [f"{report['token_text']}\n", f"ids: {report['token_ids']}\n",
                 f"template: {tuner.template.text.replace('{prompt}', report['token_text'].strip())}\n"]
        lines += [f"{key}: {report[key]:.4f}\n" for key in ("test_loss", "test_exact_match", "argmax_test_loss",
                                                            "argmax_test_exact_match") if key in report]
        write_text(os.path.join(out, "hard_prompt.txt"), "".join(lines))
    return report
