"""Reference for tests/study_tpe.rs: Optuna 5.0's TPE pipeline on a fixed history, minus the RNG.

History (recipe space, maximize): trial i < 34 has learning_rate 10^(-6 + 2 frac(0.618034 i)),
batch size [16, 32, 64, 128][i % 4], weight_decay 0.3 frac(0.414214 i) and value v(i) (below);
i % 7 == 3 is PRUNED with intermediate values {1: 0.5 v, 2: 0.8 v} (value 0.8 v); i % 11 == 5 is
FAIL; i in {32, 33} is RUNNING (with params). Then a new trial is asked. Prints, as Rust
literals, the below/above split TPESampler makes for it (constant liar on, the default), and
log l(x), log g(x) of its two Parzen estimators at fixed points.
Run: python tests/interop/tpe_reference.py
"""
import math
import warnings

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.samplers._tpe.sampler import _split_trials, default_gamma
from optuna.search_space import IntersectionSearchSpace
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


def params(i):
    return {
        "learning_rate": 10 ** (-6.0 + 2.0 * frac(0.618034 * i)),
        "per_device_train_batch_size": [16, 32, 64, 128][i % 4],
        "weight_decay": 0.3 * frac(0.414214 * i),
    }


def v(i):
    p = params(i)
    return 0.5 + 0.45 * max(
        1.0 - ((math.log10(p["learning_rate"]) + 4.5) ** 2 + (math.log2(p["per_device_train_batch_size"]) - 5.0) ** 2 / 4.0
               + (p["weight_decay"] - 0.1) ** 2 * 25.0) / 3.0, 0.0)


study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
for i in range(34):
    if i in (32, 33):
        tr = optuna.trial.create_trial(params=params(i), distributions=SPACE, state=TrialState.RUNNING)
    elif i % 7 == 3:
        tr = optuna.trial.create_trial(params=params(i), distributions=SPACE, state=TrialState.PRUNED,
                                       value=0.8 * v(i), intermediate_values={1: 0.5 * v(i), 2: 0.8 * v(i)})
    elif i % 11 == 5:
        tr = optuna.trial.create_trial(params=params(i), distributions=SPACE, state=TrialState.FAIL)
    else:
        tr = optuna.trial.create_trial(params=params(i), distributions=SPACE, value=v(i))
    study.add_trial(tr)

current = study.ask()
sampler = study.sampler
trials = [t for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING),
                                       use_cache=False) if t.number != current.number]
n = sum(t.state != TrialState.RUNNING for t in trials)
below, above = _split_trials(study, trials, default_gamma(n))
space = IntersectionSearchSpace(include_pruned=True).calculate(study)
print("space:", list(space))
print("below:", [t.number for t in below])
print("above:", [t.number for t in above])
mpe_below = sampler._build_parzen_estimator(study, space, below, handle_below=True)
mpe_above = sampler._build_parzen_estimator(study, space, above, handle_below=False)
points = {
    "learning_rate": np.array([1e-6, 3e-5, 7e-5, 1e-4]),
    "per_device_train_batch_size": np.array([0.0, 1.0, 2.0, 3.0]),
    "weight_decay": np.array([0.0, 0.1, 0.2, 0.3]),
}
print("log_l:", "[" + ", ".join(repr(float(x)) for x in mpe_below.log_pdf(points)) + "]")
print("log_g:", "[" + ", ".join(repr(float(x)) for x in mpe_above.log_pdf(points)) + "]")
