"""Reference pruning decisions for src/search/pruner/ tests, from Optuna 5.0's pruners.

Each configuration runs T trials of N steps in an in-memory study; trial i reports
value(i, s) at steps s = 1..N (trial 5 reports NaN at step 3), asks `should_prune()` after every
report, and is told PRUNED at the first positive answer or COMPLETE with value(i, N) otherwise.
Prints, per configuration, the step each trial was pruned at (0 = completed) and the
`completed_rung_*` system attributes the successive-halving pruners wrote, as Rust literals.
Run: python tests/interop/pruner_reference.py
"""
import math
import warnings

import optuna
from optuna.pruners import HyperbandPruner, MedianPruner, PercentilePruner, SuccessiveHalvingPruner
from optuna.trial import TrialState

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)

T, N = 24, 9


def value(i, s):
    if i == 5 and s == 3:
        return math.nan
    return ((i * 7919 + s * 104729) % 1000) / 1000 * 0.5 + 0.5 * s / N


CONFIGS = [
    ("median", "maximize", lambda: MedianPruner()),
    ("median_custom", "minimize", lambda: MedianPruner(n_startup_trials=2, n_warmup_steps=2, interval_steps=2)),
    ("percentile25", "maximize", lambda: PercentilePruner(25.0, n_startup_trials=3, n_min_trials=2)),
    ("sh_auto", "maximize", lambda: SuccessiveHalvingPruner()),
    ("sh_rf2", "minimize", lambda: SuccessiveHalvingPruner(min_resource=1, reduction_factor=2, min_early_stopping_rate=1)),
    ("hyperband", "maximize", lambda: HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3)),
    ("hyperband_auto", "minimize", lambda: HyperbandPruner()),
]

for name, direction, make in CONFIGS:
    study = optuna.create_study(study_name=name, direction=direction, pruner=make())
    pruned_at = []
    for i in range(T):
        trial = study.ask()
        at = 0
        for s in range(1, N + 1):
            trial.report(value(i, s), s)
            if trial.should_prune():
                at = s
                break
        if at:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value(i, N))
        pruned_at.append(at)
    rungs = [sorted(k for k in t.system_attrs if k.startswith("completed_rung_")) for t in study.trials]
    print(f"(\"{name}\", \"{direction}\", [{', '.join(map(str, pruned_at))}], [{', '.join(str(len(r)) for r in rungs)}]),")
