"""Optuna's parameter importances for a stored study, as JSON on stdout.

Usage: importance_reference.py DB_PATH STUDY_NAME

Prints {"ped_anova": {param: importance}, "fanova": [{param: importance} per seed 0, 1, 2] or
null when scikit-learn (needed by FanovaImportanceEvaluator) is not installed, "fanova_skip": why}.
Importances are normalised, as get_param_importances(normalize=True) returns them.
"""

import json
import sys

import optuna
from optuna.importance import FanovaImportanceEvaluator
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.importance import get_param_importances


def main() -> None:
    db_path, study_name = sys.argv[1], sys.argv[2]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db_path}")
    out = {
        "ped_anova": {
            k: float(v) for k, v in get_param_importances(study, evaluator=PedAnovaImportanceEvaluator()).items()
        },
        "fanova": None,
        "fanova_skip": None,
    }
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        out["fanova_skip"] = f"scikit-learn is not installed ({e})"
    else:
        out["fanova"] = [
            {
                k: float(v)
                for k, v in get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed)).items()
            }
            for seed in range(3)
        ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
