"""Runs part of the recipe's study with Python Optuna (TPESampler, the recipe's search space), so
that tests/study_interop.rs can continue it with hpo-gpu.

Usage: python python_study.py DB_PATH STUDY_NAME N_TOTAL [--enqueue] [--crash]

Runs trials until the study has N_TOTAL finished (COMPLETE + PRUNED) trials, with the same fake
objective as tests/common_study/mod.rs (`score`), reporting 3 epochs as intermediate values.
--enqueue then enqueues one fixed parameter set (a WAITING trial with `fixed_params`).
--crash then starts one more trial with heartbeats enabled and kills the process inside it,
leaving a RUNNING trial with a heartbeat, as a crashed worker would.
"""
import math
import os
import sys
import warnings

import optuna

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)


def score(lr, bs, wd):
    lo = abs(math.log10(lr) + 4.5) / 1.5
    b = abs(math.log2(bs) - 5.0) / 2.0
    w = abs(wd - 0.1) / 0.2
    return 0.5 + 0.45 * max(1.0 - (lo * lo + b * b + w * w) / 3.0, 0.0)


def objective(trial):
    lr = trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True)
    bs = trial.suggest_categorical("per_device_train_batch_size", [16, 32, 64, 128])
    wd = trial.suggest_float("weight_decay", 0.0, 0.3)
    s = score(lr, bs, wd)
    v = 0.0
    for epoch in range(1, 4):
        v = s * math.sqrt(epoch / 3)
        trial.report(v, epoch)
        trial.set_user_attr(f"epoch_{epoch}_eval_accuracy", v)
    return v


db, name, n_total = sys.argv[1], sys.argv[2], int(sys.argv[3])
flags = set(sys.argv[4:])
url = f"sqlite:///{db}"
study = optuna.create_study(
    study_name=name, storage=url, direction="maximize", load_if_exists=True,
    sampler=optuna.samplers.TPESampler(seed=0),
)
done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
if n_total > done:
    study.optimize(objective, n_trials=n_total - done)
if "--enqueue" in flags:
    study.enqueue_trial({"learning_rate": 5e-5, "per_device_train_batch_size": 64, "weight_decay": 0.05})
if "--crash" in flags:
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1)
    crashing = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(seed=1))

    def die(trial):
        trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True)
        trial.suggest_categorical("per_device_train_batch_size", [16, 32, 64, 128])
        trial.suggest_float("weight_decay", 0.0, 0.3)
        trial.report(0.55, 1)
        os._exit(0)

    crashing.optimize(die, n_trials=1)
print(len(study.trials))
