#!/usr/bin/env python3
"""Search quality: hpo-gpu's TPE (through `hpo-gpu ask` / `tell`, as a user drives it) beside
Optuna's TPESampler with its defaults, on benchmark objectives chosen to cover continuous, mixed
and log-scaled spaces of 2 to 10 dimensions (issue 15).

Every objective is minimised for 100 trials with 20 seeds; a run's score is its best value. Printed
per objective: hpo-gpu's median over seeds 0-19, and the medians of five sets of 20 Optuna seeds
(0-19, 20-39, ...) — Optuna's own seed-to-seed spread (three sets understate it: on hartmann6 the
set medians spread from -3.13 to -3.23 over six sets) — with the verdict: within that spread,
better (lower) or worse; and Optuna's median over all its seeds. The results also go to a JSON
file. The exit status is 1 when hpo-gpu is worse on some objective.

Usage: python scripts/bench_tpe_quality.py [--hpo-gpu target/release/hpo-gpu] [--trials 100]
           [--seeds 20] [--sets 5] [--jobs N] [--only NAME ...] [--json FILE]
Needs Optuna in the running Python (the project's .venv has it) and a built hpo-gpu
(`cargo build --release`).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import optuna

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)


def floats(**bounds):
    return {k: {"name": "FloatDistribution", "attributes": {"low": lo, "high": hi, "log": log}}
            for k, (lo, hi, log) in bounds.items()}


def branin(p):
    x, y = p["x"], p["y"]
    b, c, r, s, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 6, 10, 1 / (8 * math.pi)
    return (y - b * x * x + c * x - r) ** 2 + s * (1 - t) * math.cos(x) + s


HARTMANN_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
HARTMANN_P = [[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
              [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]]


def hartmann6(p):
    x = [p[f"x{i}"] for i in range(6)]
    return -sum(alpha * math.exp(-sum(a * (xi - q) ** 2 for a, xi, q in zip(row, x, prow)))
                for alpha, row, prow in zip([1.0, 1.2, 3.0, 3.2], HARTMANN_A, HARTMANN_P))


def recipe(p):
    # The recipe's space: a smooth accuracy-like bowl, best near lr 3e-5, batch 32, wd 0.1.
    lr, bs, wd = p["learning_rate"], p["per_device_train_batch_size"], p["weight_decay"]
    return ((math.log10(lr) + 4.5) ** 2 + (math.log2(bs) - 5.0) ** 2 / 4.0 + (wd - 0.1) ** 2 * 25.0) / 3.0


MIXED_OPT = {"adam": 0.0, "adamw": -0.15, "sgd": 0.25, "rmsprop": 0.1}


def mixed(p):
    # Log float + int + 4-way categorical + stepped float, with interactions.
    lr, layers, opt, drop = p["lr"], p["layers"], p["optimizer"], p["dropout"]
    u = math.log10(lr) + 3.0 + 0.1 * (layers - 4)
    return u * u * 0.3 + 0.04 * (layers - 5) ** 2 + MIXED_OPT[opt] + (drop - 0.2) ** 2 * 4 - 0.3


def log_valley(p):
    # A curved valley (Rosenbrock) in log10 space, every parameter over 4 decades.
    z = [math.log10(p[k]) - off for k, off in (("a", -4.0), ("b", -2.0), ("c", 0.0), ("d", 1.0))]
    return sum(100 * (z[i + 1] - z[i] ** 2) ** 2 + (1 - z[i]) ** 2 for i in range(3)) ** 0.5


def styblinski_tang(p):
    # 10-D, minimum -39.166 * 10 at x_i = -2.9035; divided by 10 to read per dimension.
    return sum(x ** 4 - 16 * x * x + 5 * x for x in (p[f"x{i}"] for i in range(10))) / 20.0


OBJECTIVES = {
    "branin (2-D continuous, multimodal)": (floats(x=(-5.0, 10.0, False), y=(0.0, 15.0, False)), branin),
    "hartmann6 (6-D continuous on [0,1]^6)": (floats(**{f"x{i}": (0.0, 1.0, False) for i in range(6)}), hartmann6),
    "recipe (log float, categorical, float)": ({
        "learning_rate": {"name": "FloatDistribution", "attributes": {"low": 1e-6, "high": 1e-4, "log": True}},
        "per_device_train_batch_size": {"name": "CategoricalDistribution", "attributes": {"choices": [16, 32, 64, 128]}},
        "weight_decay": {"name": "FloatDistribution", "attributes": {"low": 0.0, "high": 0.3, "log": False}},
    }, recipe),
    "mixed (log float, int, 4-way categorical, stepped float)": ({
        "lr": {"name": "FloatDistribution", "attributes": {"low": 1e-5, "high": 1e-1, "log": True}},
        "layers": {"name": "IntDistribution", "attributes": {"low": 1, "high": 8, "log": False, "step": 1}},
        "optimizer": {"name": "CategoricalDistribution", "attributes": {"choices": list(MIXED_OPT)}},
        "dropout": {"name": "FloatDistribution", "attributes": {"low": 0.0, "high": 0.5, "step": 0.05, "log": False}},
    }, mixed),
    "log valley (4-D, every parameter log over 4 decades)": (
        floats(a=(1e-6, 1e-2, True), b=(1e-4, 1.0, True), c=(1e-2, 1e2, True), d=(1e-1, 1e3, True)), log_valley),
    "styblinski-tang (10-D continuous)": (floats(**{f"x{i}": (-5.0, 5.0, False) for i in range(10)}), styblinski_tang),
}


def optuna_run(name, seed, trials):
    space, f = OBJECTIVES[name]
    dists = {k: optuna.distributions.json_to_distribution(json.dumps(v)) for k, v in space.items()}
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    for _ in range(trials):
        t = study.ask(dists)
        study.tell(t, f(t.params))
    return study.best_value


def hpo_gpu_run(binary, name, seed, trials):
    space, f = OBJECTIVES[name]
    with tempfile.TemporaryDirectory() as d:
        storage = f"sqlite:///{d}/s.db"
        best = math.inf
        for _ in range(trials):
            out = subprocess.run([binary, "ask", "--storage", storage, "--study-name", "s", "--search-space",
                                  json.dumps(space), "--direction", "minimize", "--seed", str(seed)],
                                 check=True, capture_output=True, text=True).stdout
            asked = json.loads(out)
            value = f(asked["params"])
            best = min(best, value)
            subprocess.run([binary, "tell", "--storage", storage, "--study-name", "s", "--trial-number",
                            str(asked["number"]), f"--values={value!r}"], check=True, capture_output=True)
        return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hpo-gpu", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "hpo-gpu"))
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--sets", type=int, default=5, help="sets of --seeds Optuna seeds (its spread)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", help="objectives whose name starts with one of these")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    binary = os.path.abspath(args.hpo_gpu)
    if not os.access(binary, os.X_OK):
        sys.exit(f"bench_tpe_quality.py: --hpo-gpu {binary}: no such executable (run `cargo build --release`)")
    names = [n for n in OBJECTIVES if not args.only or any(n.startswith(o) for o in args.only)]
    if not names:
        sys.exit(f"bench_tpe_quality.py: --only {args.only}: no such objective; have {list(OBJECTIVES)}")
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        ours = {n: [pool.submit(hpo_gpu_run, binary, n, s, args.trials) for s in range(args.seeds)] for n in names}
        theirs = {n: [[pool.submit(optuna_run, n, k * args.seeds + s, args.trials) for s in range(args.seeds)]
                      for k in range(args.sets)] for n in names}
        results = {}
        for n in names:
            mine = [f.result() for f in ours[n]]
            pooled = [[f.result() for f in fs] for fs in theirs[n]]
            results[n] = {"hpo_gpu_median": statistics.median(mine), "hpo_gpu_best_values": mine,
                          "optuna_set_medians": [statistics.median(v) for v in pooled],
                          "optuna_median": statistics.median(x for v in pooled for x in v)}
    print(f"TPE search quality: median best value over {args.seeds} seeds x {args.trials} trials, minimised "
          f"(optuna {optuna.__version__}; {time.time() - started:.0f} s)")
    width = max(len(n) for n in names)
    spread = f"Optuna ({args.sets} seed sets)"
    print(f"{'objective':<{width}}  {'hpo-gpu':>10}  {spread:>24}  {'Optuna, all':>11}  verdict")
    verdicts = []
    for n in names:
        r = results[n]
        lo, hi = min(r["optuna_set_medians"]), max(r["optuna_set_medians"])
        m = r["hpo_gpu_median"]
        verdict = "within" if lo <= m <= hi else ("better" if m < lo else "WORSE")
        r["verdict"] = verdict
        verdicts.append(verdict)
        print(f"{n:<{width}}  {m:>10.4f}  {lo:>11.4f} … {hi:<10.4f}  {r['optuna_median']:>11.4f}  {verdict}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"trials": args.trials, "seeds": args.seeds, "sets": args.sets, "optuna": optuna.__version__,
                       "results": results},
                      fh, indent=1)
    return 1 if "WORSE" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
