"""Loads a study with Optuna and prints what Optuna sees, as JSON; optionally draws the recipe's plots.

Usage: python check_hpo_study.py DB_PATH STUDY_NAME [PLOT_DIR]

Used by tests/study_interop.rs: the Rust side compares this with what it stored. With PLOT_DIR,
runs optuna.visualization.matplotlib's plot_optimization_history, plot_intermediate_values and
plot_param_importances on the study and saves PNGs there ("plots_skipped" says why if it cannot).
"""
import json
import math
import sys
import warnings

import optuna

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)


def clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


db, name = sys.argv[1], sys.argv[2]
plot_dir = sys.argv[3] if len(sys.argv) > 3 else None
study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
out = {
    "direction": study.direction.name,
    "user_attrs": clean(study.user_attrs),
    "trials": [
        {
            "number": t.number,
            "state": t.state.name,
            "value": clean(t.value),
            "params": clean(t.params),
            "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
            "intermediate_values": clean(t.intermediate_values),
            "user_attrs": clean(t.user_attrs),
            "system_attrs": clean(t.system_attrs),
            "has_start": t.datetime_start is not None,
            "has_complete": t.datetime_complete is not None,
        }
        for t in study.trials
    ],
}
try:
    best = study.best_trial
    out["best"] = {"number": best.number, "value": best.value, "params": clean(best.params),
                   "intermediate_values": clean(best.intermediate_values)}
except ValueError:
    out["best"] = None
try:
    out["dataframe_rows"] = len(study.trials_dataframe())
except ImportError as e:  # pandas is optional for Optuna
    out["dataframe_skipped"] = str(e)

if plot_dir is not None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError as e:
        out["plots_skipped"] = f"matplotlib is not installed ({e})"
    else:
        written = []
        for fname, fn in [
            ("optimization_history", ovm.plot_optimization_history),
            ("intermediate_values", ovm.plot_intermediate_values),
            ("param_importances", ovm.plot_param_importances),
        ]:
            ax = fn(study)
            path = f"{plot_dir}/{fname}.png"
            ax.figure.savefig(path)
            plt.close(ax.figure)
            written.append(path)
        out["plots"] = written
        out["importances"] = clean(dict(optuna.importance.get_param_importances(study)))
print(json.dumps(out))
