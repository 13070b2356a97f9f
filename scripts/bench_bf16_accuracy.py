#!/usr/bin/env python3
"""Accuracy of `--precision bf16` against fp32 on the recipe's IMDB workload, over several seeds.

For each seed, `hpo-gpu train` (by default the recipe's: the bert-tiny shape, random init, IMDB
seed-42 subsets of 2,500 / 1,000 reviews, 512 tokens, 3 epochs, the best epoch kept) runs once in fp32 and once in bf16 with
the same hyperparameters; the script reports each run's eval accuracy and loss of the kept epoch,
the mean and standard deviation over seeds per precision, and writes them as JSON. bf16 counts as
equal to fp32 when the mean difference is within the seed-to-seed spread of fp32.

  .venv/bin/python scripts/bench_bf16_accuracy.py --seeds 1,2,3
  .venv/bin/python scripts/bench_bf16_accuracy.py --model ../shared/data/all-MiniLM-L6-v2 \
      --max-length 128 --train-samples 1000 --eval-samples 1000 --epochs 1 --learning-rate 5e-5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(args, seed: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "bert-tiny":
            model = ["--model", str(REPO / "configs" / "bert-tiny"), "--random-init",
                     "--tokenizer", str(args.data / "bert-base-uncased" / "tokenizer.json")]
        else:
            model = ["--model", str(args.model)]
        cmd = [
            str(args.hpo_gpu), "train", *model, "--dataset", str(args.data),
            "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
            "--max-length", str(args.max_length),
            "--learning-rate", str(args.learning_rate), "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--seed", str(seed), "--precision", precision,
            "--device", "cpu", "--output", tmp, "--quiet",
        ]
        print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"hpo-gpu exited with status {proc.returncode}: {proc.stderr.strip()}")
        metrics = json.loads((Path(tmp) / "training_metrics.json").read_text())
    kept = metrics["epochs"][metrics["best_epoch"] - 1]
    return {
        "seed": seed, "precision": precision, "best_epoch": metrics["best_epoch"],
        "eval_accuracy": kept["eval_accuracy"], "eval_loss": kept["eval_loss"],
        "train_seconds": sum(e["train_seconds"] for e in metrics["epochs"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hpo-gpu", type=Path, default=REPO / "target" / "release" / "hpo-gpu")
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    ap.add_argument("--model", default="bert-tiny",
                    help='"bert-tiny" (its shape, random init) or a local model folder, e.g. all-MiniLM-L6-v2')
    ap.add_argument("--train-samples", type=int, default=2500)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bf16_accuracy.json")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds: no seed given")
    if not args.hpo_gpu.is_file():
        ap.error(f"--hpo-gpu {args.hpo_gpu}: binary not found (cargo build --release)")

    runs = [train(args, seed, precision) for seed in seeds for precision in ("fp32", "bf16")]
    summary = {}
    for precision in ("fp32", "bf16"):
        acc = [r["eval_accuracy"] for r in runs if r["precision"] == precision]
        summary[precision] = {"mean_accuracy": statistics.mean(acc),
                              "sd_accuracy": statistics.stdev(acc) if len(acc) > 1 else None}
    diffs = [b["eval_accuracy"] - a["eval_accuracy"] for a, b in zip(runs[::2], runs[1::2])]
    summary["mean_difference_bf16_minus_fp32"] = statistics.mean(diffs)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    doc = {"model": args.model, "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join([sys.executable] + sys.argv), "cpu_model": cpu, "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'seed':>4} {'fp32 acc':>9} {'bf16 acc':>9} {'fp32 loss':>9} {'bf16 loss':>9}")
    for a, b in zip(runs[::2], runs[1::2]):
        print(f"{a['seed']:>4} {a['eval_accuracy']:>9.4f} {b['eval_accuracy']:>9.4f} "
              f"{a['eval_loss']:>9.4f} {b['eval_loss']:>9.4f}")
    for precision in ("fp32", "bf16"):
        s = summary[precision]
        sd = "-" if s["sd_accuracy"] is None else f"{s['sd_accuracy']:.4f}"
        print(f"{precision}: mean accuracy {s['mean_accuracy']:.4f}, sd {sd}")
    print(f"bf16 - fp32: {summary['mean_difference_bf16_minus_fp32']:+.4f}; written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
