"""Reference numbers for the Parzen-estimator unit tests in src/search/sampler/parzen.rs.

Builds Optuna 5.0's _ParzenEstimator (TPESampler's default parameters) on fixed observations and
prints the mixture (weights, per-parameter mus/sigmas or categorical weights) and log_pdf at fixed
points, as Rust array literals. Run: python tests/interop/parzen_reference.py
"""
import numpy as np
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator, _ParzenEstimatorParameters
from optuna.samplers._tpe.probability_distributions import _BatchedCategoricalDistributions
from optuna.samplers._tpe.sampler import default_weights

PARAMS = _ParzenEstimatorParameters(
    prior_weight=1.0, consider_magic_clip=True, consider_endpoints=False, weights=default_weights, multivariate=True
)


def arr(xs):
    return "[" + ", ".join(repr(float(x)) for x in np.ravel(xs)) + "]"


def dump(name, space, obs, points):
    pe = _ParzenEstimator({k: np.asarray(v, dtype=float) for k, v in obs.items()}, space, PARAMS)
    m = pe._mixture_distribution
    print(f"// case {name}")
    print(f"weights: {arr(m.weights)}")
    for pname, d in zip(space, m.distributions):
        if isinstance(d, _BatchedCategoricalDistributions):
            print(f"{pname} cat_weights: {arr(d.weights)}")
        else:
            print(f"{pname} mus: {arr(d.mu)}")
            print(f"{pname} sigmas: {arr(d.sigma)}")
    lp = pe.log_pdf({k: np.asarray(v, dtype=float) for k, v in points.items()})
    print(f"log_pdf: {arr(lp)}")


space_a = {
    "lr": FloatDistribution(1e-6, 1e-4, log=True),
    "wd": FloatDistribution(0.0, 0.3),
    "drop": FloatDistribution(0.0, 0.5, step=0.1),
    "epochs": IntDistribution(1, 5),
    "bs_log": IntDistribution(8, 256, log=True),
    "bs": CategoricalDistribution([16, 32, 64, 128]),
}
obs_a = {
    "lr": [3e-5, 1e-6, 7.5e-5, 2e-5, 2e-5],
    "wd": [0.1, 0.25, 0.0, 0.3, 0.12],
    "drop": [0.1, 0.2, 0.5, 0.0, 0.1],
    "epochs": [1, 3, 5, 2, 2],
    "bs_log": [8, 64, 256, 32, 17],
    "bs": [0, 3, 1, 1, 2],
}
points_a = {
    "lr": [1e-6, 5e-5, 1e-4, 2.2e-5],
    "wd": [0.0, 0.15, 0.3, 0.11],
    "drop": [0.0, 0.3, 0.5, 0.1],
    "epochs": [1, 2, 5, 3],
    "bs_log": [8, 100, 256, 20],
    "bs": [0, 1, 3, 2],
}
dump("A", space_a, obs_a, points_a)

rng = np.random.RandomState(0)
obs_b = {"x": list(np.round(rng.uniform(-2.0, 3.0, size=30), 6))}
print(f"obs_b: {arr(obs_b['x'])}")
dump("B", {"x": FloatDistribution(-2.0, 3.0)}, obs_b, {"x": [-2.0, -0.5, 0.0, 1.25, 3.0]})

dump("C", {"x": FloatDistribution(1.0, 10.0, log=True), "c": CategoricalDistribution(["a", "b", "c"])},
     {"x": [], "c": []}, {"x": [1.0, 3.0, 10.0], "c": [0, 1, 2]})
