"""Interleaved A/B of engines on one model: round-robin epochs over the same 4 batches of 32 (prompt L), median
epoch per engine. `python benchmarks/ab_engines.py smollm2|random:gpt2 L naive,generic,fused ROUNDS`. Round-robin
in one process, because this 2-core VM drifts by +-20 % over minutes (a row timed minutes after its baseline
reads that drift as speed)."""
import sys, time, json, os, statistics, torch
import fastprompt as fp
from fastprompt.data import load_pairs, subsample
model_name, L, engines, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
if model_name == "smollm2":
    m, tok = fp.load_model("smollm2")
else:
    m, tok = fp.load_model(model_name)
pairs = subsample(load_pairs(), 128, seed=0)
tuners = {}
for e in engines:
    kw = {"kernels": "torch"} if e == "fused" else {}
    t = fp.PromptTuner(m, tok, "Here are two {prompt} {input} and {target}", L, engine=e, seed=0, **kw)
    t.optimizer = t.make_optimizer(1e-3)
    enc = t.encode(pairs)
    t._bs = t.batches(enc, 32, 0)
    for b in t._bs[:1]: t.train_step(b)  # warm-up
    tuners[e] = t
times = {e: [] for e in engines}
for r in range(rounds):
    for e in engines:
        t = tuners[e]; t0 = time.perf_counter()
        tot = sum(t.train_step(b) for b in t._bs); float(tot)
        times[e].append(time.perf_counter() - t0)
med = {e: statistics.median(v) for e, v in times.items()}
base = med.get("naive")
for e in engines:
    print(f"{e:8s} median {med[e]:.3f} s  min {min(times[e]):.3f}  " + (f"x naive {base/med[e]:.2f}" if base else ""), flush=True)
print(json.dumps({"model": model_name, "L": L, "times": times, "load": os.getloadavg()}))
