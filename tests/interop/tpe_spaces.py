"""Reference for tests/study_tpe.rs (issue 15): Optuna's TPE estimators on mixed and log-scaled
spaces, with fixed pseudo-random histories, minus the RNG of the proposal itself.

For each space: 40 trials (a few PRUNED with intermediate values, one FAIL, two RUNNING with
params, as constant liar sees them), then a new trial is asked. Prints one JSON document: per
space the distributions (Optuna's JSON), the trials, the below/above split TPESampler makes, and
log l(x), log g(x) of its two Parzen estimators at 64 points drawn in internal representation,
jointly and for each parameter alone.
Run: python tests/interop/tpe_spaces.py
"""
import json
import math
import warnings

import numpy as np
import optuna
from optuna.distributions import (CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json)
from optuna.samplers._tpe.sampler import _split_trials, default_gamma
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import TrialState

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)

SPACES = {
    "mixed": {
        "lr": FloatDistribution(1e-5, 1e-1, log=True),
        "layers": IntDistribution(1, 8),
        "optimizer": CategoricalDistribution(["adam", "sgd", "rmsprop", "adagrad"]),
        "dropout": FloatDistribution(0.0, 0.5, step=0.05),
    },
    "log_scaled": {
        "a": FloatDistribution(1e-3, 10.0, log=True),
        "b": FloatDistribution(1e-2, 100.0, log=True),
        "c": IntDistribution(1, 10000, log=True),
        "d": IntDistribution(2, 512, step=2),
    },
    # No two equal observations: the joint densities are compared too (see the test).
    "log_floats": {name: FloatDistribution(10.0 ** k, 10.0 ** (k + 4), log=True)
                   for name, k in [("w", -6), ("x", -3), ("y", -1), ("z", 0)]},
}


def draw(rng, dist):
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(rng.integers(len(dist.choices)))]
    if dist.log:
        x = math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
        return int(min(max(round(x), dist.low), dist.high)) if isinstance(dist, IntDistribution) else x
    if dist.step is not None:
        k = int(rng.integers(round((dist.high - dist.low) / dist.step) + 1))
        v = dist.low + k * dist.step
        return int(v) if isinstance(dist, IntDistribution) else v
    return float(rng.uniform(dist.low, dist.high))


def objective(params, space):
    s = 0.0
    for name, dist in space.items():
        v = params[name]
        if isinstance(dist, CategoricalDistribution):
            s += 0.3 * dist.choices.index(v)
        elif dist.log:
            s += (math.log(v / dist.low) / math.log(dist.high / dist.low) - 0.3) ** 2
        else:
            s += ((v - dist.low) / (dist.high - dist.low) - 0.6) ** 2
    return s


out = {}
for space_name, space in SPACES.items():
    rng = np.random.default_rng(7)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    trials = []
    for i in range(40):
        p = {name: draw(rng, d) for name, d in space.items()}
        v = objective(p, space)
        if i in (37, 38):
            state, value, inter = TrialState.RUNNING, None, {}
        elif i % 9 == 4:
            state, value, inter = TrialState.PRUNED, 1.2 * v, {1: 1.5 * v, 2: 1.2 * v}
        elif i == 13:
            state, value, inter = TrialState.FAIL, None, {}
        else:
            state, value, inter = TrialState.COMPLETE, v, {}
        study.add_trial(optuna.trial.create_trial(params=p, distributions=space, state=state, value=value,
                                                  intermediate_values=inter))
        trials.append({"params": p, "state": state.name, "value": value,
                       "intermediate_values": [[k, x] for k, x in inter.items()]})
    current = study.ask()
    sampler = study.sampler
    history = [t for t in study._get_trials(deepcopy=False, use_cache=False,
                                            states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
               if t.number != current.number]
    n = sum(t.state != TrialState.RUNNING for t in history)
    below, above = _split_trials(study, history, default_gamma(n))
    rel = IntersectionSearchSpace(include_pruned=True).calculate(study)
    rel = {k: d for k, d in rel.items() if not d.single()}
    l = sampler._build_parzen_estimator(study, rel, below, handle_below=True)
    g = sampler._build_parzen_estimator(study, rel, above, handle_below=False)
    points = {}
    for name, d in rel.items():
        points[name] = [d.to_internal_repr(draw(rng, d)) for _ in range(64)]
    arrays = {k: np.array(v, dtype=float) for k, v in points.items()}
    # Each parameter alone: what a tie between two observations cannot change (see the test).
    marginals = {}
    for name, d in rel.items():
        one_l = sampler._build_parzen_estimator(study, {name: d}, below, handle_below=True)
        one_g = sampler._build_parzen_estimator(study, {name: d}, above, handle_below=False)
        marginals[name] = {"log_l": [float(x) for x in one_l.log_pdf({name: arrays[name]})],
                           "log_g": [float(x) for x in one_g.log_pdf({name: arrays[name]})]}
    # Quantiles of 20,000 candidates drawn from each estimator (internal representation).
    probs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    draws = {}
    for key, mpe in (("l", l), ("g", g)):
        sampled = mpe.sample(np.random.RandomState(0), 20000)
        draws[key] = {name: [float(q) for q in np.quantile(sampled[name], probs, method="inverted_cdf")]
                      for name in rel}
    out[space_name] = {
        "sample_probs": probs,
        "sample_quantiles": draws,
        "marginals": marginals,
        "distributions": [[k, distribution_to_json(d)] for k, d in space.items()],
        "relative_space": list(rel),
        "trials": trials,
        "below": [t.number for t in below],
        "above": [t.number for t in above],
        "points": points,
        "log_l": [float(x) for x in l.log_pdf(arrays)],
        "log_g": [float(x) for x in g.log_pdf(arrays)],
    }
print(json.dumps(out))
