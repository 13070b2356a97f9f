#!/usr/bin/env python3
"""Compares one TPE `ask` of hpo-gpu with Optuna's TPESampler on the same history.

Builds the history of benches/ask_latency.rs (100 and 1,000 finished trials of the recipe's search
space) in Optuna — in memory and in SQLite — times `study.ask(fixed_distributions=space)` (which
samples all three parameters) followed by failing the trial (so the history stays the same), runs
`cargo bench --bench ask_latency` for hpo-gpu's numbers, and prints both with the ratio.
With --postgres URL (a PostgreSQL database both may create studies and databases in), also one
`ask` + `tell(FAIL)` through RDBStorage on that server beside hpo-gpu's through the same server
(needs psycopg2: `pip install psycopg2-binary`).

Usage: python scripts/bench_ask_vs_optuna.py [--repeats N] [--skip-cargo] [--postgres URL]
"""
import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)

SPACE = {
    "learning_rate": FloatDistribution(1e-6, 1e-4, log=True),
    "per_device_train_batch_size": CategoricalDistribution([16, 32, 64, 128]),
    "weight_decay": FloatDistribution(0.0, 0.3),
}


def frac(x):
    return x - math.floor(x)


def history_trial(i):
    lr = 10 ** (-6.0 + 2.0 * frac(0.618034 * i))
    bs = [16, 32, 64, 128][i % 4]
    wd = 0.3 * frac(0.414214 * i)
    value = 0.5 + 0.45 * max(
        1.0 - ((math.log10(lr) + 4.5) ** 2 + (math.log2(bs) - 5.0) ** 2 / 4.0 + (wd - 0.1) ** 2 * 25.0) / 3.0, 0.0
    )
    return optuna.trial.create_trial(
        params={"learning_rate": lr, "per_device_train_batch_size": bs, "weight_decay": wd},
        distributions=SPACE,
        value=value,
    )


def time_optuna(n, storage, repeats, with_tell=False):
    study = optuna.create_study(
        study_name=f"bench{n}", storage=storage, direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
    )
    study.add_trials([history_trial(i) for i in range(n)])
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        trial = study.ask(fixed_distributions=SPACE)
        if not with_tell:
            times.append(time.perf_counter() - t0)
        study.tell(trial, state=TrialState.FAIL)
        if with_tell:
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])  # the first asks warm caches


UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def time_hpo_gpu(repo, postgres):
    env = dict(os.environ)
    if postgres:
        env["HPO_GPU_POSTGRES_URL"] = postgres
    out = subprocess.run(
        ["cargo", "bench", "--bench", "ask_latency"], cwd=repo, capture_output=True, text=True, check=True, env=env
    ).stdout
    results = {}
    # criterion: "tpe_ask/memory/100\n  time:   [1.2 ms 1.3 ms 1.4 ms]" (name and time may share a line)
    for m in re.finditer(r"tpe_ask/(\w+)/(\d+)\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", out):
        results[(m.group(1), int(m.group(2)))] = float(m.group(3)) * UNITS[m.group(4)]
    return results, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-cargo", action="store_true", help="only time Optuna")
    ap.add_argument("--postgres", help="postgresql://user:password@host:port/db: also ask+tell through it")
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"optuna {optuna.__version__}, python {sys.version.split()[0]}")
    ours = {}
    if not args.skip_cargo:
        ours, raw = time_hpo_gpu(repo, args.postgres)
        if not ours:
            sys.exit("could not parse cargo bench output:\n" + raw)
    with tempfile.TemporaryDirectory() as d:
        for n in (100, 1000):
            for kind, storage in (("memory", None), ("sqlite", f"sqlite:///{d}/optuna{n}.db")):
                theirs = time_optuna(n, storage, args.repeats)
                line = f"{kind:6} n={n:5}: optuna {theirs * 1e3:9.3f} ms"
                if (kind, n) in ours:
                    mine = ours[(kind, n)]
                    line += f"   hpo-gpu {mine * 1e3:9.3f} ms   ratio {theirs / mine:7.1f}x"
                print(line, flush=True)
    if args.postgres:
        import psycopg2  # noqa: F401  (SQLAlchemy's driver for postgresql+psycopg2://)

        base, _ = args.postgres.rsplit("/", 1)
        for n in (100, 1000):
            # A database of its own per size, as the Rust side makes.
            db = f"optuna_ask_{n}"
            admin = psycopg2.connect(args.postgres)
            admin.autocommit = True
            admin.cursor().execute(f"DROP DATABASE IF EXISTS {db}")
            admin.cursor().execute(f"CREATE DATABASE {db}")
            admin.close()
            url = base.replace("postgresql://", "postgresql+psycopg2://", 1) + "/" + db
            theirs = time_optuna(n, url, args.repeats, with_tell=True)
            line = f"postgres ask+tell n={n:5}: optuna {theirs * 1e3:9.3f} ms"
            if ("postgres", n) in ours:
                mine = ours[("postgres", n)]
                line += f"   hpo-gpu {mine * 1e3:9.3f} ms   ratio {theirs / mine:7.1f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
