"""Reference numbers for src/search/sampler/truncnorm.rs, from Optuna 5.0's _truncnorm and math.erf.

Run: python tests/interop/truncnorm_reference.py
"""
import math

import numpy as np
from optuna.samplers._tpe import _truncnorm as tn

for x in [0.0, 1e-10, 0.3, -0.7, 1.0, 2.0, -3.5, 5.0, 10.0, 27.0]:
    print(f"erf ({x!r}, {math.erf(x)!r}, {math.erfc(x)!r}),")
print("log_ndtr(-25)", repr(float(tn._log_ndtr(np.array([-25.0]))[0])))
print("log_ndtr(7)", repr(float(tn._log_ndtr(np.array([7.0]))[0])))
for a, b in [(-1.0, 2.0), (1.0, 3.0), (-5.0, -4.0)]:
    print(f"log_gauss_mass({a}, {b})", repr(float(tn._log_gauss_mass(np.array([a]), np.array([b]))[0])))
for q, a, b in [(0.3, -1.0, 2.0), (0.9, 0.5, 4.0), (0.01, -8.0, -6.0)]:
    print(f"ppf({q}, {a}, {b})", repr(float(tn.ppf(np.array([q]), a, b)[0])))
print("logpdf(0.2, -1, 2, 0.1, 0.5)", repr(float(tn.logpdf(np.array([0.2]), -1.0, 2.0, 0.1, 0.5)[0])))
