"""Run: .venv/bin/python benchmarks/u_init_weights.py POOL_DIR   (a pool sampled with score_train_prompt: true)

First- and second-visit negative weights ĝ/u of DFT2 and DFT under u_init one, from a real pool, with the
untrained model's scores as at the start of training. The trainer scores negatives under the training
prompt x, so s(y') = the pool's logp_train_prompt (per token for DFT2). DFT's weight also divides by its
reference: under `reference: train_prompt` that is the same log P_g0(y'|x), so w = s/τ - ref = 0 at τ = 1
and ĝ = 1; under `reference: sampler_prompt` it is logp_sampler = log P_g0(y'|x̄), and w = log P_g0(y'|x) -
log P_g0(y'|x̄) at τ = 1, which is not 0. (u_init first_batch gives weight 1.0 at the first visit by design.)
"""
import json
import math
import statistics
import sys

from dftlite.pool import load_pool


def log_mean_exp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


meta, pool = load_pool(sys.argv[1])
records = [[r for r in rs if not r["gold_duplicate"]] for rs in pool.values()]
records = [rs for rs in records if len(rs) >= 4]
if not records or "logp_train_prompt" not in records[0][0]:
    sys.exit(f"{sys.argv[1]}: needs at least 4 negatives per prompt and logp_train_prompt (sample with score_train_prompt: true)")
variants = {
    "dft2": (0.3, 0.9, lambda r: r["logp_train_prompt"] / r["num_tokens"] / 0.3),
    "dft (reference: train_prompt)": (1.0, 0.85, lambda r: r["logp_train_prompt"] - r["logp_train_prompt"]),
    "dft (reference: sampler_prompt)": (1.0, 0.85, lambda r: r["logp_train_prompt"] - r["logp_sampler"]),
}
for name, (tau, gamma, log_weight) in variants.items():
    first, second = [], []
    for rs in records:
        w = [log_weight(r) for r in rs]
        g1, g2 = log_mean_exp(w[:2]), log_mean_exp(w[2:4])
        u1 = math.log((1 - gamma) * 1.0 + gamma * math.exp(g1))
        u2 = math.log((1 - gamma) * math.exp(u1) + gamma * math.exp(g2))
        first.append(math.exp(g1 - u1))
        second.append(math.exp(g2 - u2))
    print(json.dumps({"method": name, "tau": tau, "gamma": gamma, "prompts": len(first),
                      "u_init_one": {"visit1_weight_median": round(statistics.median(first), 3),
                                     "visit2_weight_median": round(statistics.median(second), 3)}}))
