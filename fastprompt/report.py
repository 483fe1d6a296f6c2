"""What the CLI reports after training (``final`` line of metrics.jsonl, ``hard_prompt.txt``): the test
metrics of the trained prompt, its token readout, for a relaxed prompt its argmax tokens as a hard prompt,
and (``--baseline``) a hand-written prompt's metrics on the same test examples, side by side."""
from __future__ import annotations

import os
from typing import Any

import torch

from .methods.relaxed import RelaxedMethod
from .models import embedding_table
from .outputs import write_text
from .tuner import PromptTuner, generation_count


@torch.no_grad()
def final_report(tuner, test, eval_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """What the CLI reports after training: the method's test metrics (loss on every test example, generation
    metrics on at most ``eval_size``), its token readout, and for a relaxed prompt the metrics of its argmax
    tokens used as a hard prompt."""
    report: dict[str, Any] = {"event": "final", "method": tuner.method.name, "prompt_len": tuner.prompt_len}
    if test:
        # the last epoch's test loss, and its generation metrics where it took them on as many examples, where
        # no step came after it and it was taken on these very examples (the CLI's test split): not computed twice
        last_eval = getattr(tuner, "last_eval", None)
        known = last_eval[1] if last_eval is not None and last_eval[0] is test else {}
        n_gen = generation_count(len(test), eval_size)
        if "exact_match" in known and last_eval[2] == n_gen:  # decoded these very examples already
            metrics = dict(known)
        else:
            metrics = tuner.evaluate(test, generation_size=eval_size, progress=progress, loss=not known)
            if known:
                metrics["loss"] = known["loss"]
        report.update({f"test_{k}": v for k, v in metrics.items()})
        report["eval_size"] = n_gen
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


def baseline_report(tuner, text: str, test, eval_size: int | None = None, progress: bool = False) -> dict[str, Any]:
    """The hand-written prompt ``text`` (as many vectors as its tokens, at the token embeddings: the soft
    method's ``text:`` init, 0 steps) evaluated like the trained prompt: same template, engine, precision and
    test examples. The ``baseline`` line of metrics.jsonl."""
    words = text.strip()
    n_tokens = len(tuner.tokenizer(" " + words, add_special_tokens=False)["input_ids"])
    engine = tuner.engine.name if tuner.engine.name in ("naive", "generic", "fused") else "auto"
    probe = PromptTuner(tuner.model, tuner.tokenizer, tuner.template, n_tokens, engine=engine,
                        precision=tuner.precision, init=f"text:{words}")
    metrics = probe.evaluate(test, generation_size=eval_size, progress=progress)
    return {"event": "baseline", "text": " " + words, "prompt_len": n_tokens,
            **{f"test_{k}": v for k, v in metrics.items()}}


def comparison_table(baseline: dict[str, Any], final: dict[str, Any], steps: int) -> str:
    """The hand-written and the trained prompt side by side (the CLI's last lines)."""
    n = final.get("prompt_len", "?")
    trained = (f"trained {final['method']} prompt {final['token_text']!r} ({n} tokens, {steps} steps)"
               if "token_text" in final else f"trained {final['method']} prompt ({n} vectors, {steps} steps)")
    rows = [(f"hand-written {baseline['text']!r} ({baseline['prompt_len']} tokens)", baseline), (trained, final)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'prompt':<{width}}  test loss  exact match  parrot rate"]
    for name, r in rows:
        lines.append(f"{name:<{width}}  {r['test_loss']:9.4f}  {100 * r.get('test_exact_match', float('nan')):10.1f}%"
                     f"  {100 * r.get('test_parrot_rate', float('nan')):10.1f}%")
    delta = baseline["test_loss"] - final["test_loss"]
    lines.append(f"the trained prompt's test loss is {abs(delta):.3f} nat {'below' if delta >= 0 else 'ABOVE'} "
                 "the hand-written one's")
    return "\n".join(lines)
