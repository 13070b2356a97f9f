#!/usr/bin/env python3
"""Side-by-side CPU throughput: transformers Trainer vs the hpo-gpu binary, same workload, one run.

Workload (the recipe's, scaled down): IMDB train/test seed-42 subsets, a model (--model:
"bert-tiny" = the bert-tiny shape with random init, the Hub being unreachable; or a local model
folder such as ../shared/data/all-MiniLM-L6-v2, loaded on both sides with a new classifier head
and its own tokenizer), max_length --max-length (512), 1 epoch, one batch size at a time. transformers pads every example to max_length exactly as the recipe does
(padding="max_length"); hpo-gpu does whatever it does (that difference is the point).

For each batch size b:
  transformers: Trainer(per_device_train_batch_size=b, per_device_eval_batch_size=b), timed
                trainer.train() and trainer.evaluate() (tokenization excluded, as the recipe
                tokenizes once up front with dataset.map)
  hpo-gpu:      `hpo-gpu train ... --batch-size b`, read <tmp>/training_metrics.json
and report train / eval examples per second and the ratio hpo-gpu / transformers.

If the binary is missing or fails, the transformers side is still reported and the script
exits with status 1, saying so.

hpo-gpu's CPU matrix multiply follows HPO_GPU_GEMM (onednn | openblas | matrixmultiply; unset:
oneDNN on AVX-512 CPUs where libdnnl.so.2 loads, else matrixmultiply) from the environment; the
run records which library it used (training_metrics.json's "gemm"). --precision bf16 runs hpo-gpu with
`--precision bf16` and transformers with TrainingArguments(bf16=True) (CPU autocast);
--transformers-precision fp32 keeps transformers in fp32 (the recipe as users run it).

  /work/main/.venv/bin/python scripts/bench_vs_transformers.py --batch-sizes 16,64
  /work/main/.venv/bin/python scripts/bench_vs_transformers.py --model ../shared/data/all-MiniLM-L6-v2 \
      --max-length 128 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def read_jsonl_gz(path: Path) -> list[dict]:
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    # Split on "\n" only: reviews contain U+0085, which str.splitlines() treats as a line break.
    return [json.loads(line) for line in text.split("\n") if line]


def seed42_subset(data: Path, split: str, n: int) -> list[dict]:
    rows = read_jsonl_gz(data / f"imdb_{split}.jsonl.gz")
    perm = [int(x) for x in (data / "imdb_hf_shuffle_seed42_perm.txt").read_text().split()]
    if len(perm) != len(rows):
        raise SystemExit(f"{data}: permutation has {len(perm)} entries but imdb_{split} has {len(rows)} rows")
    if n > len(rows):
        raise SystemExit(f"--{split}-samples {n} exceeds the {len(rows)} rows of imdb_{split}")
    return [rows[i] for i in perm[:n]]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def padded_encoder(tokenizer_json: Path, max_length: int):
    """The recipe's tokenization: rows -> Trainer examples, every one padded to max_length."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=max_length, model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )

    def encode(rows):
        enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=max_length)
        return [
            {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
             "attention_mask": enc["attention_mask"][i], "labels": rows[i]["label"]}
            for i in range(len(rows))
        ]

    return encode


def run_transformers(args, train_rows, eval_rows, batch_size: int) -> dict:
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    encode = padded_encoder(tokenizer_file(args), args.max_length)
    t0 = time.perf_counter()
    train_ds, eval_ds = encode(train_rows), encode(eval_rows)
    tokenize_s = time.perf_counter() - t0
    real_tokens = sum(sum(x["attention_mask"]) for x in train_ds)

    torch.manual_seed(42)
    if args.model == "bert-tiny":
        config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=512, num_labels=2)
        model = BertForSequenceClassification(config)
    else:
        model = BertForSequenceClassification.from_pretrained(str(args.model), num_labels=2)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            num_train_epochs=args.epochs,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=args.transformers_precision == "bf16",
            seed=42,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
                          compute_metrics=accuracy)
        t0 = time.perf_counter()
        train_out = trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eval_metrics = trainer.evaluate()
        eval_s = time.perf_counter() - t0

    n_train, n_eval = len(train_ds) * args.epochs, len(eval_ds)
    return {
        "train_examples_per_second": n_train / train_s,
        "eval_examples_per_second": n_eval / eval_s,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "tokenize_seconds": tokenize_s,
        "train_loss": train_out.training_loss,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_accuracy": eval_metrics.get("eval_accuracy"),
        "trainer_metrics": {**{k: v for k, v in train_out.metrics.items()},
                            **{k: v for k, v in eval_metrics.items()}},
        "mean_real_tokens_per_train_example": real_tokens / len(train_ds),
        "torch_threads": torch.get_num_threads(),
    }


def tokenizer_file(args) -> Path:
    """bert-tiny uses the uncased BERT vocabulary of the shared data; a model folder its own."""
    if args.model == "bert-tiny":
        return args.data / "bert-base-uncased" / "tokenizer.json"
    return Path(args.model) / "tokenizer.json"


def model_flags(args) -> list[str]:
    if args.model == "bert-tiny":
        return ["--model", str(REPO / "configs" / "bert-tiny"), "--random-init"]
    return ["--model", str(args.model)]


def run_hpo_gpu(args, batch_size: int) -> dict:
    binary = args.hpo_gpu
    if not binary.is_file():
        raise RuntimeError(f"{binary}: binary not found (build it with `cargo build --release`)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(binary), "train",
            *model_flags(args),
            "--tokenizer", str(tokenizer_file(args)),
            "--dataset", str(args.data),
            "--train-samples", str(args.train_samples), "--eval-samples", str(args.eval_samples),
            "--batch-size", str(batch_size), "--epochs", str(args.epochs),
            "--max-length", str(args.max_length), "--output", tmp, "--seed", "42",
            "--precision", args.precision,
        ]
        print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall_s = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-10:]
            raise RuntimeError(f"hpo-gpu exited with status {proc.returncode}: " + " | ".join(tail))
        metrics_path = Path(tmp) / "training_metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text())
            last = metrics["epochs"][-1]
            res = {
                "train_examples_per_second": float(last["train_examples_per_second"]),
                "eval_examples_per_second": float(last["eval_examples_per_second"]),
                "train_seconds": sum(float(e["train_seconds"]) for e in metrics["epochs"]),
                "eval_seconds": float(last["eval_seconds"]),
                "train_loss": last.get("train_loss"),
                "eval_loss": last.get("eval_loss"),
                "eval_accuracy": last.get("eval_accuracy"),
                "process_wall_seconds": wall_s,
                "training_metrics": metrics,
            }
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"{metrics_path}: unreadable or incomplete training metrics: {e!r}") from e
    return res


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hpo-gpu", type=Path, default=REPO / "target" / "release" / "hpo-gpu")
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data")
    ap.add_argument("--model", default="bert-tiny",
                    help='"bert-tiny" (its shape, random init) or a local model folder (config.json, '
                         'model.safetensors, tokenizer.json)')
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "cpu_vs_transformers.json")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="hpo-gpu's --precision (bf16: linear layers' products in bf16, AMX/AVX512_BF16)")
    ap.add_argument("--transformers-precision", choices=["fp32", "bf16"],
                    help="transformers' precision (bf16: TrainingArguments(bf16=True), CPU autocast); "
                         "default: as --precision")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-hpo-gpu", action="store_true")
    args = ap.parse_args()
    if args.transformers_precision is None:
        args.transformers_precision = args.precision
    if args.model != "bert-tiny":
        folder = Path(args.model)
        missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
        if missing:
            ap.error(f"--model {args.model}: not a model folder (missing {', '.join(missing)})")
    if args.max_length < 8:
        ap.error(f"--max-length: expected at least 8, got {args.max_length}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        ap.error(f"--batch-sizes: expected positive integers, got {args.batch_sizes!r}")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}", flush=True)
    train_rows = seed42_subset(args.data, "train", args.train_samples)
    eval_rows = seed42_subset(args.data, "test", args.eval_samples)

    results, hpo_errors = [], []
    for b in batch_sizes:
        row: dict = {"batch_size": b, "transformers": None, "hpo_gpu": None, "hpo_gpu_error": None}
        if not args.skip_transformers:
            print(f"[transformers] batch size {b} ...", flush=True)
            row["transformers"] = run_transformers(args, train_rows, eval_rows, b)
        if not args.skip_hpo_gpu:
            print(f"[hpo-gpu] batch size {b} ...", flush=True)
            try:
                row["hpo_gpu"] = run_hpo_gpu(args, b)
            except RuntimeError as e:
                row["hpo_gpu_error"] = str(e)
                hpo_errors.append(f"batch size {b}: {e}")
        t, h = row["transformers"], row["hpo_gpu"]
        if t and h:
            row["ratio_hpo_gpu_over_transformers"] = {
                "train": h["train_examples_per_second"] / t["train_examples_per_second"],
                "eval": h["eval_examples_per_second"] / t["eval_examples_per_second"],
            }
        results.append(row)

    doc = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "workload": {
            "dataset": "IMDB, HF shuffle(seed=42) subsets: train[:N] of train, test[:M] of test",
            "train_samples": args.train_samples, "eval_samples": args.eval_samples,
            "epochs": args.epochs, "max_length": args.max_length, "batch_sizes": batch_sizes,
            "model": ("bert-tiny shape (hidden 128, 2 layers, 2 heads, FFN 512, vocab 30522), random init"
                      if args.model == "bert-tiny" else f"{args.model} (pretrained encoder, new classifier head)"),
            "transformers_padding": "max_length (every example padded to max_length, as the recipe)",
            "eval_batch_size": "equal to the train batch size on both sides",
            "precision": {"hpo_gpu": args.precision, "transformers": args.transformers_precision},
        },
        "machine": {
            "cpu_model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "hpo_gpu_binary": str(args.hpo_gpu),
            "hpo_gpu_gemm": next((r["hpo_gpu"]["training_metrics"].get("gemm") for r in results
                                  if r.get("hpo_gpu") and r["hpo_gpu"].get("training_metrics")),
                                 os.environ.get("HPO_GPU_GEMM") or "the default"),
            "repo_commit": git_commit(),
        },
        "results": results,
        "hpo_gpu_ran": not args.skip_hpo_gpu and not hpo_errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")

    print()
    print(f"CPU: {doc['machine']['cpu_model']}, {doc['machine']['logical_cores']} cores, "
          f"torch threads {doc['machine']['torch_threads']}; {doc['date_utc']}")
    print(f"workload: {args.model}, {args.train_samples} train / {args.eval_samples} eval examples, "
          f"{args.epochs} epoch(s), max_length {args.max_length}; GEMM {doc['versions']['hpo_gpu_gemm']}; "
          f"precision: transformers {args.transformers_precision}, hpo-gpu {args.precision}")
    print(f"{'batch':>5} | {'train ex/s':^27} | {'eval ex/s':^27}")
    print(f"{'':>5} | {'transformers':>12} {'hpo-gpu':>8} {'ratio':>5} | {'transformers':>12} {'hpo-gpu':>8} {'ratio':>5}")
    for row in results:
        t, h, r = row["transformers"] or {}, row["hpo_gpu"] or {}, row.get("ratio_hpo_gpu_over_transformers") or {}
        print(f"{row['batch_size']:>5} | {fmt(t.get('train_examples_per_second')):>12} "
              f"{fmt(h.get('train_examples_per_second')):>8} {fmt(r.get('train'), '.2f'):>5} | "
              f"{fmt(t.get('eval_examples_per_second')):>12} {fmt(h.get('eval_examples_per_second')):>8} "
              f"{fmt(r.get('eval'), '.2f'):>5}")
    print(f"written: {args.out}")

    if args.skip_hpo_gpu:
        print("hpo-gpu side skipped (--skip-hpo-gpu): no ratio measured", file=sys.stderr)
        return 1
    if hpo_errors:
        print("hpo-gpu side did NOT run; only the transformers side is reported:", file=sys.stderr)
        for e in hpo_errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
