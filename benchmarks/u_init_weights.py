"""Run: .venv/bin/python benchmarks/u_init_weights.py POOL_DIR

First- and second-visit DFT2/DFT negative weights ĝ/u under u_init one vs first_batch, from a real pool
(scores of the untrained model: the pool's logp_sampler, per token for DFT2), as at the start of training."""
import json, math, sys, statistics
from dftlite.sampling import load_pool
meta, pool = load_pool(sys.argv[1])
def lme(xs):
    m = max(xs); return m + math.log(sum(math.exp(x - m) for x in xs) / len(xs))
for name, tau, gamma in [("dft2", 0.3, 0.9), ("dft", 1.0, 0.85)]:
    first_one, second_one = [], []
    for records in pool.values():
        rs = [r for r in records if not r["gold_duplicate"]]
        if len(rs) < 4: continue
        if name == "dft2":
            w = [r["logp_sampler"] / r["num_tokens"] / tau for r in rs]
        else:  # s = log P_g(y'|x̄) at the start equals the reference: w = s/τ - ref = 0 for τ = 1
            w = [r["logp_sampler"] / tau - r["logp_sampler"] for r in rs]
        g1, g2 = lme(w[:2]), lme(w[2:4])
        u1 = math.log((1 - gamma) * 1.0 + gamma * math.exp(g1))
        u2 = math.log((1 - gamma) * math.exp(u1) + gamma * math.exp(g2))
        first_one.append(math.exp(g1 - u1)); second_one.append(math.exp(g2 - u2))
    print(json.dumps({"method": name, "prompts": len(first_one),
                      "u_init_one": {"visit1_weight_median": round(statistics.median(first_one), 3),
                                     "visit2_weight_median": round(statistics.median(second_one), 3)},
                      "u_init_first_batch": {"visit1_weight": 1.0}}))
