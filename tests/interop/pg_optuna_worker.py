"""An Optuna worker on a PostgreSQL study, for tests/study_postgres.rs: joins study NAME at URL
(SQLAlchemy form, postgresql+psycopg2://…) with RDBStorage and heartbeats, and runs N trials of a
cheap objective with Optuna's default TPESampler; prints the trial numbers it ran.
Usage: python tests/interop/pg_optuna_worker.py URL NAME N
"""
import sys
import warnings

import optuna

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)

url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=30)
study = optuna.load_study(study_name=name, storage=storage)
ran = []


def objective(trial):
    lr = trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True)
    ran.append(trial.number)
    return 0.5 + 0.01 * (lr * 1e4)


study.optimize(objective, n_trials=n)
print("OPTUNA_RAN=" + ",".join(map(str, ran)))
