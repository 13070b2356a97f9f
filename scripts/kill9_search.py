#!/usr/bin/env python3
"""Kill -9 anywhere: SIGKILLs `hpo-gpu search` and `hpo-gpu train --from-study` at random moments
and checks that nothing that was stored is lost or corrupted.

Three kinds of kill, in turn:
  trial    at a random moment after the start (mostly inside a trial's training),
  storage  right as the study database changes (the SQLite WAL file grows), so inside or just
           after a storage write,
  export   right as `train --from-study` starts writing its model folder (the temporary
           `.final_model.tmp-PID` folder appears).
After every kill the same command is started again; with --slots N (N > 1) every other search
start runs the trial array (`search --slots N`, N trials RUNNING at once in one process), so kills
also land with several trials in flight and a study moves between the two modes. Checked after each kill: every trial that was
COMPLETE before is still COMPLETE with the same value and intermediate values, `PRAGMA
integrity_check` is ok, and the exported model folder is either the previous complete export or
the new complete one, never half of one. At the end the search runs to completion and must hold
exactly --n-trials COMPLETE trials, and `optuna.load_study` must read the study (when optuna is
importable; --require-optuna makes its absence an error).

Usage: scripts/kill9_search.py --bin target/release/hpo-gpu [--kills 20] [--n-trials 12] [--seed 1]
                               [--slots 3]
The workload (a small random-init BERT, a few hundred short examples) is generated in a temporary
folder, so the script needs nothing but the binary. Exit status 0 = every check passed.
"""

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

WORDS_POS = ["good", "great", "fine", "superb", "lovely", "nice"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "was", "."]
STUDY = "kill9"


def make_workload(root, n_train, n_test, rng):
    model = os.path.join(root, "model")
    os.makedirs(model)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + WORDS_POS + WORDS_NEG
    with open(os.path.join(model, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True}, f)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 32,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                   "max_position_embeddings": 128, "hidden_dropout_prob": 0.1,
                   "attention_probs_dropout_prob": 0.1}, f)
    data = os.path.join(root, "data")
    os.makedirs(data)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(data, split + ".jsonl"), "w") as f:
            for _ in range(n):
                label = rng.randrange(2)
                pool = WORDS_POS if label else WORDS_NEG
                words = [rng.choice(pool if rng.random() < 0.7 else FILLER)
                         for _ in range(rng.randrange(8, 60))]
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return model, data


def read_trials(db):
    """{number: (state, values, intermediate values)}; read-only, so it never writes the study."""
    if not os.path.exists(db):
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT trial_id, number, state FROM trials ORDER BY number").fetchall()
        out = {}
        for trial_id, number, state in rows:
            values = [v for (v,) in con.execute(
                "SELECT value FROM trial_values WHERE trial_id=? ORDER BY objective", (trial_id,))]
            steps = dict(con.execute(
                "SELECT step, intermediate_value FROM trial_intermediate_values WHERE trial_id=?",
                (trial_id,)).fetchall())
            out[number] = (state, values, steps)
        return out
    finally:
        con.close()


def integrity(db):
    if not os.path.exists(db):
        return "ok"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def mtime_size(path):
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        return None


def wait_then_kill(proc, trigger, deadline_s):
    """Polls `trigger()` until it is true (or the process exits / the deadline passes); kills
    right away. Returns True when the process was killed while running."""
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            return False
        if trigger():
            break
        time.sleep(0.0002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def export_complete(folder, expected_files):
    """A complete export: the expected files, a parseable config.json and a safetensors file whose
    header fits the file's length."""
    names = sorted(os.listdir(folder))
    if expected_files is not None and names != expected_files:
        return f"files {names}, expected {expected_files}"
    with open(os.path.join(folder, "config.json")) as f:
        json.load(f)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    if 8 + n + end != len(blob):
        return f"model.safetensors is {len(blob)} bytes, its header describes {8 + n + end}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="the hpo-gpu binary")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", help="keep the workload here instead of a temporary folder")
    ap.add_argument("--require-optuna", action="store_true")
    ap.add_argument("--slots", type=int, default=1,
                    help="N > 1: every other search start runs the trial array with N slots")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = args.workdir or tempfile.mkdtemp(prefix="hpo-gpu-kill9-")
    os.makedirs(root, exist_ok=True)
    model, data = make_workload(root, 1200, 200, rng)
    # Learning rates that learn something in two epochs, so trials' values differ.
    space = os.path.join(root, "space.toml")
    with open(space, "w") as f:
        f.write('[learning_rate]\ntype = "float"\nlow = 1e-4\nhigh = 3e-3\nlog = true\n\n'
                '[per_device_train_batch_size]\ntype = "categorical"\nchoices = [16, 32]\n')
    db = os.path.join(root, "study.db")
    wal = db + "-wal"
    out_dir = os.path.join(root, "final_model")
    common = ["--model", model, "--random-init", "--dataset", data, "--train-samples", "0",
              "--eval-samples", "0", "--max-length", "96", "--epochs", "2", "--device", "cpu",
              "--storage", f"sqlite:///{db}"]
    search = [args.bin, "search", *common, "--study-name", STUDY, "--n-trials", str(args.n_trials),
              "--pruner", "none", "--sampler-seed", "7", "--space", space, "--heartbeat-interval", "0.5",
              "--grace-period", "1.5", "--failed-trial-max-retry", "100"]
    search_array = [*search, "--slots", str(args.slots)]
    array_starts = 0
    train = [args.bin, "train", *common, "--from-study", STUDY, "--output", out_dir, "--quiet"]
    log = open(os.path.join(root, "log.txt"), "w")
    failures = []

    def check(label, before):
        after = read_trials(db)
        for number, (state, values, steps) in before.items():
            if state != "COMPLETE":
                continue
            if after.get(number) != (state, values, steps):
                failures.append(f"{label}: trial {number} was COMPLETE {values} {steps}, "
                                f"now {after.get(number)}")
        ok = integrity(db)
        if ok != "ok":
            failures.append(f"{label}: integrity_check says {ok}")
        return after

    def run_to_end(cmd, what):
        r = subprocess.run(cmd, stdout=log, stderr=log, timeout=900)
        if r.returncode != 0:
            failures.append(f"{what} exited {r.returncode} (log: {log.name})")

    # Phase 1: kill the search, two thirds of the kills, alternating random moments and writes.
    search_kills = max(1, args.kills * 2 // 3)
    killed = {"trial": 0, "storage": 0, "export": 0}
    attempts = 0
    while sum(killed.values()) < search_kills and attempts < search_kills * 5:
        attempts += 1
        before = read_trials(db)
        finished = sum(1 for s, _, _ in before.values() if s == "COMPLETE")
        if finished >= args.n_trials:
            break
        kind = "trial" if attempts % 2 else "storage"
        # Modes alternate on every second start, so both kinds of kill land in both modes.
        in_array = args.slots > 1 and (attempts // 2) % 2 == 1
        proc = subprocess.Popen(search_array if in_array else search, stdout=log, stderr=log)
        if in_array:
            array_starts += 1
        if kind == "trial":
            delay = rng.uniform(0.1, 3.0)
            t0 = time.monotonic()
            hit = wait_then_kill(proc, lambda: time.monotonic() - t0 >= delay, delay + 1)
        else:
            # Skip the first few writes (startup), then kill on a random later one.
            skip = rng.randrange(1, 12)
            state = {"last": mtime_size(wal), "seen": 0}

            def wrote():
                now = mtime_size(wal)
                if now != state["last"]:
                    state["last"] = now
                    state["seen"] += 1
                return state["seen"] >= skip
            hit = wait_then_kill(proc, wrote, 30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if hit:
            killed[kind] += 1
        check(f"after {kind} kill {sum(killed.values())}", before)

    # Phase 2: finish the search, export once, then kill exports while they write.
    before = read_trials(db)
    run_to_end(search_array if args.slots > 1 else search, "the uninterrupted search")
    after = check("after the final search", before)
    run_to_end(train, "the first export")
    expected = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    if expected is None:
        failures.append("the first export wrote no model folder")
    attempts = 0
    while sum(killed.values()) < args.kills and attempts < args.kills * 5:
        attempts += 1
        proc = subprocess.Popen(train, stdout=log, stderr=log)

        def writing():
            return any(n.startswith(".final_model.tmp-") for n in os.listdir(root))
        hit = False
        if wait_then_kill(proc, writing, 120):
            hit = True
        elif proc.poll() is None:
            proc.kill()
            proc.wait()
        if hit:
            killed["export"] += 1
            time.sleep(rng.uniform(0, 0.002))
        if not os.path.isdir(out_dir):
            failures.append(f"export kill {killed['export']}: no model under {out_dir}")
        else:
            problem = export_complete(out_dir, expected)
            if problem:
                failures.append(f"export kill {killed['export']}: half a model: {problem}")
    run_to_end(train, "the final export")
    leftovers = [n for n in os.listdir(root) if n.startswith(".final_model.")]
    if leftovers:
        failures.append(f"leftovers of killed exports after a clean export: {leftovers}")
    if os.path.isdir(out_dir) and export_complete(out_dir, expected):
        failures.append("the final export is incomplete")

    complete = [n for n, (s, _, _) in after.items() if s == "COMPLETE"]
    if len(complete) != args.n_trials:
        failures.append(f"{len(complete)} COMPLETE trials, --n-trials was {args.n_trials}")
    try:
        import optuna  # noqa: PLC0415 (optional dependency)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}")
        ours = {n: v for n, (s, v, _) in after.items() if s == "COMPLETE"}
        theirs = {t.number: t.values for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE}
        if ours != theirs:
            failures.append(f"optuna reads other values: {theirs} vs {ours}")
        optuna_note = f"optuna.load_study read {len(study.trials)} trials"
    except ImportError:
        if args.require_optuna:
            failures.append("optuna is not importable (--require-optuna)")
        optuna_note = "optuna not importable: load_study not checked"

    total = sum(killed.values())
    for kind, n in killed.items():
        if n == 0:
            failures.append(f"no kill landed {kind!r}: raise --kills")
    if args.slots > 1 and array_starts == 0:
        failures.append("no search start ran the trial array: raise --kills")
    if total < args.kills:
        failures.append(f"only {total} kills landed while a process was running, wanted {args.kills}")
    states = {}
    for s, _, _ in after.values():
        states[s] = states.get(s, 0) + 1
    print(f"kills: {total} ({killed['trial']} during trials, {killed['storage']} on storage writes, "
          f"{killed['export']} during exports); trials by state {states}; {optuna_note}")
    if args.slots > 1:
        print(f"search starts with --slots {args.slots}: {array_starts} (the others one trial at a time)")
    print(f"workload and log: {root}")
    if failures:
        for f in failures:
            print("FAILED:", f)
        return 1
    print("kill9: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
