"""Creates a database with Optuna's own RDBStorage (one empty study), for the schema comparison in
tests/study_interop.rs. Usage: python make_empty_optuna_db.py DB_PATH"""
import sys
import warnings

import optuna

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
optuna.create_study(study_name="empty", storage=f"sqlite:///{sys.argv[1]}", direction="maximize")
