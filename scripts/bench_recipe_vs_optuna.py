#!/usr/bin/env python3
"""The recipe's whole study, end to end: transformers Trainer + Optuna against `hpo-gpu search`,
same workload, one run, wall-clock seconds and their ratio.

The recipe (README, "The recipe's study"): IMDB train/test seed-42 subsets (2,500 / 1,000),
bert-tiny (its shape with random init: the Hub is unreachable here), 512 tokens, a study in SQLite
with 5 trials, TPE, `learning_rate` log [1e-6, 1e-4], batch size {16, 32, 64, 128},
`weight_decay` [0, 0.3], each trial re-creating the model and training 3 epochs with evaluation
and a checkpoint every epoch, the best epoch kept, maximizing eval accuracy.

transformers + Optuna: the recipe as users write it — tokenize once (padding to 512), then
  `optuna.create_study(storage="sqlite:///…/optuna_trials.db", load_if_exists=True,
  sampler=TPESampler(seed))` and `study.optimize(objective, n_trials)`, the objective building a
  Trainer (eval/save each epoch, `load_best_model_at_end`) and returning the best eval accuracy.
  Timed from tokenization to the end of `optimize`.
hpo-gpu: `hpo-gpu search` on the same files, timed as a process (start-up, tokenization and the
  study), with `--pruner none` (the recipe prunes nothing) unless --hpo-gpu-args says otherwise.

The two samplers would draw different points, and a trial's batch size sets most of its cost, so
by default the transformers side replays the parameters hpo-gpu's study drew
(`study.enqueue_trial`, in order): both sides train the same five configurations. With 5 trials
that changes nothing in kind — TPE's first 10 trials are random draws on both sides.
--own-sampling lets Optuna draw its own.

  .venv/bin/python scripts/bench_recipe_vs_optuna.py --out benchmarks/recipe_vs_optuna.json
  .venv/bin/python scripts/bench_recipe_vs_optuna.py --skip-transformers --hpo-gpu-args "--slots 2"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_transformers import REPO, cpu_model, git_commit, padded_encoder, seed42_subset  # noqa: E402

SPACE_BATCH_SIZES = [16, 32, 64, 128]


def run_transformers_optuna(args, storage_dir: Path, replay: list[dict] | None) -> dict:
    import numpy as np
    import optuna
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    t_start = time.perf_counter()
    train_rows = seed42_subset(args.data, "train", args.train_samples)
    eval_rows = seed42_subset(args.data, "test", args.eval_samples)
    encode = padded_encoder(args.data / "bert-base-uncased" / "tokenizer.json", args.max_length)
    train_ds, eval_ds = encode(train_rows), encode(eval_rows)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    trials = []

    def objective(trial):
        t0 = time.perf_counter()
        lr = trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True)
        batch = trial.suggest_categorical("per_device_train_batch_size", SPACE_BATCH_SIZES)
        wd = trial.suggest_float("weight_decay", 0.0, 0.3)
        torch.manual_seed(42)
        config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=512, num_labels=2)
        model = BertForSequenceClassification(config)
        with tempfile.TemporaryDirectory(dir=storage_dir) as out:
            targs = TrainingArguments(
                output_dir=out,
                learning_rate=lr,
                per_device_train_batch_size=batch,
                per_device_eval_batch_size=args.eval_batch_size,
                weight_decay=wd,
                num_train_epochs=args.epochs,
                eval_strategy="epoch",
                save_strategy="epoch",
                load_best_model_at_end=True,
                metric_for_best_model="accuracy",
                logging_strategy="no",
                report_to=[],
                use_cpu=True,
                seed=42,
                disable_tqdm=True,
            )
            trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                              compute_metrics=accuracy)
            trainer.train()
            value = trainer.evaluate()["eval_accuracy"]
        trials.append({"number": trial.number, "params": dict(trial.params), "value": value,
                       "seconds": time.perf_counter() - t0})
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="transformers_optuna_study", storage=f"sqlite:///{storage_dir}/optuna_trials.db",
        direction="maximize", load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=args.sampler_seed),
    )
    for params in replay or []:
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=args.n_trials)
    return {
        "seconds": time.perf_counter() - t_start,
        "best_value": study.best_value,
        "best_params": study.best_params,
        "trials": trials,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "optuna": optuna.__version__,
                     "transformers": __import__("transformers").__version__},
    }


def run_hpo_gpu(args, storage_dir: Path) -> dict:
    db = storage_dir / "hpo_gpu_trials.db"
    cmd = [
        str(args.hpo_gpu), "search",
        "--model", str(REPO / "configs" / "bert-tiny"), "--random-init",
        "--tokenizer", str(args.data / "bert-base-uncased"), "--dataset", str(args.data),
        "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
        "--max-length", str(args.max_length), "--epochs", str(args.epochs),
        "--eval-batch-size", str(args.eval_batch_size),
        "--storage", f"sqlite:///{db}", "--n-trials", str(args.n_trials),
        "--sampler-seed", str(args.sampler_seed), "--device", "cpu", "--pruner", "none",
        *shlex.split(args.hpo_gpu_args),
    ]
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-10:]
        raise RuntimeError(f"hpo-gpu search exited with status {proc.returncode}: " + " | ".join(tail))
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT t.number, t.state, v.value, t.datetime_start, t.datetime_complete FROM trials t "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id ORDER BY t.number").fetchall()
        params = con.execute(
            "SELECT t.number, p.param_name, p.param_value, p.distribution_json FROM trial_params p "
            "JOIN trials t ON t.trial_id = p.trial_id").fetchall()
    trials = []
    for number, state, value, start, end in rows:
        trial_params = {}
        for n, name, raw, dist in params:
            if n != number:
                continue
            d = json.loads(dist)
            trial_params[name] = (d["attributes"]["choices"][int(raw)]
                                  if d["name"] == "CategoricalDistribution" else raw)
        trials.append({"number": number, "state": state, "value": value, "params": trial_params,
                       "start": start, "complete": end})
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    best = max(done, key=lambda t: t["value"]) if done else None
    return {"seconds": seconds, "best_value": best and best["value"], "best_params": best and best["params"],
            "trials": trials, "command": shlex.join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hpo-gpu", type=Path, default=REPO / "target" / "release" / "hpo-gpu")
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    ap.add_argument("--n-trials", type=int, default=5)
    ap.add_argument("--train-samples", type=int, default=2500)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-batch-size", type=int, default=32, help="both sides (hpo-gpu's default)")
    ap.add_argument("--sampler-seed", type=int, default=42)
    ap.add_argument("--hpo-gpu-args", default="", help="extra flags for hpo-gpu search, e.g. \"--slots 2\"")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "recipe_vs_optuna.json")
    ap.add_argument("--own-sampling", action="store_true",
                    help="let Optuna draw its own trials instead of replaying hpo-gpu's")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-hpo-gpu", action="store_true")
    args = ap.parse_args()
    if not (args.data / "imdb_train.jsonl.gz").exists():
        print(f"error: --data {args.data}: no imdb_train.jsonl.gz (the shared data folder)", file=sys.stderr)
        return 1
    if not args.skip_hpo_gpu and not args.hpo_gpu.exists():
        print(f"error: --hpo-gpu {args.hpo_gpu} does not exist (cargo build --release)", file=sys.stderr)
        return 1

    result = {"transformers_optuna": None, "hpo_gpu": None}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_hpo_gpu:
            try:
                result["hpo_gpu"] = run_hpo_gpu(args, Path(tmp))
            except (RuntimeError, OSError, sqlite3.Error) as e:
                print(f"error: {e}", file=sys.stderr)
                failed = True
        if not args.skip_transformers:
            replay = None
            if result["hpo_gpu"] and not args.own_sampling:
                replay = [tr["params"] for tr in result["hpo_gpu"]["trials"] if tr["state"] == "COMPLETE"]
            result["transformers_optuna"] = run_transformers_optuna(args, Path(tmp), replay)

    t, h = result["transformers_optuna"], result["hpo_gpu"]
    doc = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "workload": {"model": "bert-tiny shape, random init", "train_samples": args.train_samples,
                     "eval_samples": args.eval_samples, "max_length": args.max_length, "epochs": args.epochs,
                     "n_trials": args.n_trials, "eval_batch_size": args.eval_batch_size,
                     "sampler": f"TPE, seed {args.sampler_seed}", "hpo_gpu_args": args.hpo_gpu_args,
                     "transformers_trials": "own TPE draws" if args.own_sampling else "hpo-gpu's, replayed"},
        "machine": {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform()},
        "repo_commit": git_commit(),
        **result,
        "ratio_transformers_seconds_over_hpo_gpu_seconds": (t["seconds"] / h["seconds"]) if t and h else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"CPU: {doc['machine']['cpu_model']}, {doc['machine']['logical_cores']} cores; {doc['date_utc']}")
    for name, side in [("transformers + Optuna", t), ("hpo-gpu search", h)]:
        if side:
            batches = [tr["params"].get("per_device_train_batch_size") for tr in side["trials"]]
            print(f"{name:>22}: {side['seconds']:8.1f} s, best accuracy {side['best_value']}, batch sizes {batches}")
    if doc["ratio_transformers_seconds_over_hpo_gpu_seconds"]:
        print(f"{'ratio':>22}: {doc['ratio_transformers_seconds_over_hpo_gpu_seconds']:.2f}x")
    print(f"written: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
