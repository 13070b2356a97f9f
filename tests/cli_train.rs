//! End-to-end tests of `hpo-gpu train` / `predict` on a tiny model and dataset made in the test,
//! the export loaded back by transformers, and bad input at the command line.

mod common;

use common::{tiny_data, tiny_model};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::hpo_gpu as run;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn train_tiny(dir: &Path) -> (PathBuf, Output) {
    train_tiny_with(dir, &[], &[])
}

/// [`train_tiny`] with extra environment variables and flags.
fn train_tiny_with(dir: &Path, env: &[(&str, &str)], flags: &[&str]) -> (PathBuf, Output) {
    let model = tiny_model(dir);
    let data = tiny_data(dir);
    let out = dir.join("final");
    let o = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
        .envs(env.iter().copied())
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--random-init",
            "--dataset",
            data.to_str().unwrap(),
            "--train-samples",
            "0",
            "--eval-samples",
            "0",
            "--learning-rate",
            "2e-2",
            "--batch-size",
            "8",
            "--epochs",
            "5",
            "--max-length",
            "16",
            "--output",
            out.to_str().unwrap(),
            "--quiet",
            "--device",
            "cpu",
        ])
        .args(flags)
        .output()
        .expect("run hpo-gpu");
    (out, o)
}

fn epoch_losses(out: &Path) -> Vec<f64> {
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_metrics.json")).unwrap()).unwrap();
    metrics["epochs"].as_array().unwrap().iter().map(|e| e["train_loss"].as_f64().unwrap()).collect()
}

/// The library training_metrics.json says multiplied the matrices.
fn gemm_recorded(out: &Path) -> String {
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_metrics.json")).unwrap()).unwrap();
    metrics["gemm"].as_str().unwrap_or("(none)").to_string()
}

/// `HPO_GPU_GEMM` picks the CPU's matrix-multiply library: OpenBLAS (where libopenblas.so.0
/// loads), oneDNN (where libdnnl.so.2 loads) and matrixmultiply train the same model to the same
/// losses up to rounding; a missing library or a name that is none of them is one clear line.
#[test]
fn the_gemm_library_is_chosen_by_hpo_gpu_gemm() {
    let tmp = tempfile::tempdir().unwrap();
    let rust_dir = tmp.path().join("rust");
    let (out, o) = train_tiny_with(&rust_dir, &[("HPO_GPU_GEMM", "matrixmultiply")], &[]);
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let reference = epoch_losses(&out);
    assert_eq!(gemm_recorded(&out), "matrixmultiply");
    let blas_dir = tmp.path().join("blas");
    let (out, o) = train_tiny_with(&blas_dir, &[("HPO_GPU_GEMM", "openblas")], &[]);
    if o.status.success() {
        let losses = epoch_losses(&out);
        for (epoch, (a, b)) in losses.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-3 * b.abs(), "epoch {epoch}: OpenBLAS loss {a}, matrixmultiply {b}");
        }
    } else {
        let err = stderr(&o);
        assert!(std::env::var_os("HPO_GPU_REQUIRE_OPENBLAS").is_none(), "OpenBLAS is required here: {err}");
        assert_eq!(
            err.trim_end(),
            "error: HPO_GPU_GEMM=openblas but libopenblas.so.0 cannot be loaded (apt-get install libopenblas0-pthread)"
        );
    }
    let onednn_dir = tmp.path().join("onednn");
    let (out, o) = train_tiny_with(&onednn_dir, &[("HPO_GPU_GEMM", "onednn")], &[]);
    if o.status.success() {
        let losses = epoch_losses(&out);
        for (epoch, (a, b)) in losses.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-3 * b.abs(), "epoch {epoch}: oneDNN loss {a}, matrixmultiply {b}");
        }
        assert_eq!(gemm_recorded(&out), "oneDNN_f32");
    } else {
        let err = stderr(&o);
        let required =
            ["HPO_GPU_REQUIRE_ONEDNN", "HPO_GPU_REQUIRE_BF16"].iter().any(|v| std::env::var_os(v).is_some());
        assert!(!required, "oneDNN is required here: {err}");
        assert_eq!(
            err.trim_end(),
            "error: HPO_GPU_GEMM=onednn needs oneDNN 2.x, but libdnnl.so.2 cannot be loaded (apt-get install libdnnl2)"
        );
    }
    let missing = [("HPO_GPU_GEMM", "onednn"), ("HPO_GPU_ONEDNN", "/nonexistent/libdnnl.so.2")];
    let (out, o) = train_tiny_with(&tmp.path().join("no_onednn"), &missing, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim_end(),
        "error: HPO_GPU_GEMM=onednn needs oneDNN 2.x, but /nonexistent/libdnnl.so.2 cannot be loaded (apt-get \
         install libdnnl2)"
    );
    assert!(!out.exists(), "a refused run wrote {}", out.display());
    let (_, o) = train_tiny_with(&tmp.path().join("bad"), &[("HPO_GPU_GEMM", "mkl")], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim_end(),
        "error: HPO_GPU_GEMM=\"mkl\" is not a GEMM library (use openblas, onednn or matrixmultiply)"
    );
}

/// `--precision bf16` trains with the linear layers' products in bf16 (oneDNN on AMX or
/// AVX512_BF16): the model learns to losses near fp32's but not equal to them (the operands
/// really are rounded), and the metrics record it. Where it cannot run, one line says why
/// (oneDNN missing, a CPU without bf16 instructions) and nothing is written.
#[test]
fn precision_bf16_trains_near_fp32_or_says_why_not() {
    const NO_LIBRARY: &str = "error: --precision bf16 needs oneDNN 2.x, but /nonexistent/libdnnl.so.2 cannot be \
                              loaded (apt-get install libdnnl2)";
    const NO_INSTRUCTIONS: &str = "error: --precision bf16 needs a CPU with AMX or AVX512_BF16 instructions, and \
                                   this one has neither (use --precision fp32)";
    let tmp = tempfile::tempdir().unwrap();
    let (out, o) = train_tiny_with(&tmp.path().join("fp32"), &[], &[]);
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let reference = epoch_losses(&out);
    let (out, o) = train_tiny_with(&tmp.path().join("bf16"), &[], &["--precision", "bf16"]);
    let bf16_runs = o.status.success();
    if bf16_runs {
        assert!(
            stderr(&o).contains("note: linear layers' products in bf16 by oneDNN bf16 ("),
            "{}",
            stderr(&o)
        );
        let losses = epoch_losses(&out);
        assert_ne!(losses, reference, "bf16 gave fp32's losses bit for bit: were the products rounded?");
        for (epoch, (a, b)) in losses.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 0.1 * b.abs() + 0.02, "epoch {epoch}: bf16 loss {a}, fp32 {b}");
        }
        assert!(losses.last() < losses.first(), "bf16 did not learn: {losses:?}");
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("training_metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["precision"], "bf16");
    } else {
        let err = stderr(&o);
        assert!(std::env::var_os("HPO_GPU_REQUIRE_BF16").is_none(), "bf16 is required here: {err}");
        assert!(
            [NO_LIBRARY.replace("/nonexistent/libdnnl.so.2", "libdnnl.so.2"), NO_INSTRUCTIONS.into()]
                .contains(&err.trim_end().to_string()),
            "{err}"
        );
        assert!(!out.exists(), "a refused run wrote {}", out.display());
    }
    let (out, o) = train_tiny_with(
        &tmp.path().join("no_library"),
        &[("HPO_GPU_ONEDNN", "/nonexistent/libdnnl.so.2")],
        &["--precision", "bf16"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end(), NO_LIBRARY);
    assert!(!out.exists());
    if bf16_runs {
        // oneDNN's own switch caps the instructions it may use: as on a CPU without bf16.
        let (out, o) = train_tiny_with(
            &tmp.path().join("no_bf16"),
            &[("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")],
            &["--precision", "bf16"],
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert_eq!(stderr(&o).trim_end(), NO_INSTRUCTIONS);
        assert!(!out.exists());
    }
}

#[test]
fn train_learns_saves_and_predicts() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, o) = train_tiny(tmp.path());
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("epoch ")).count(), 5, "{stdout}");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "training_metrics.json"] {
        assert!(out.join(f).is_file(), "{f} missing from the export");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training_metrics.json")).unwrap()).unwrap();
    let epochs = metrics["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 5);
    let last_acc = epochs[4]["eval_accuracy"].as_f64().unwrap();
    assert!(last_acc >= 0.9, "the task is trivially learnable; accuracy {last_acc}");
    assert!(epochs[4]["train_loss"].as_f64().unwrap() < epochs[0]["train_loss"].as_f64().unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"]["0"], "neg");
    assert_eq!(config["id2label"]["1"], "pos");
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");

    let p = run(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--json",
        "the movie was great, lovely.",
        "the movie was awful, dull.",
    ]);
    assert!(p.status.success(), "{}", stderr(&p));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&p.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["label"], "pos");
    assert_eq!(lines[1]["label"], "neg");
    let probs = lines[0]["probabilities"].as_object().unwrap();
    let total: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9);
}

/// Batch prediction: texts from a data file (`--input`, no label column needed), from standard
/// input (one per line) and as arguments give the same labels in the input's order; `--csv`
/// writes one row per text with a probability column per label.
#[test]
fn predict_reads_files_and_standard_input_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, o) = train_tiny(tmp.path());
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let model = out.to_str().unwrap();
    let test_file = tmp.path().join("data/test.jsonl");
    let texts: Vec<String> = std::fs::read_to_string(&test_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts.len(), 32);
    let json_lines = |o: &Output| -> Vec<serde_json::Value> {
        assert!(o.status.success(), "{}", stderr(o));
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    // As arguments: the reference (batches of 5, so several passes and a short last one).
    let mut args = vec!["predict", "--model", model, "--json", "--batch-size", "5"];
    args.extend(texts.iter().map(String::as_str));
    let reference = json_lines(&run(&args));
    assert_eq!(reference.len(), 32);
    for (line, text) in reference.iter().zip(&texts) {
        assert_eq!(line["text"], text.as_str(), "output in input order");
    }
    let labels: Vec<&serde_json::Value> = reference.iter().map(|l| &l["label"]).collect();
    assert!(labels.iter().any(|l| *l == "pos") && labels.iter().any(|l| *l == "neg"));

    // From a data file (the test split; its labels are ignored) and from a CSV without labels.
    let from_file =
        json_lines(&run(&["predict", "--model", model, "--json", "--input", test_file.to_str().unwrap()]));
    assert_eq!(from_file, reference);
    let csv_in = tmp.path().join("texts.csv");
    let mut body = String::from("id,review\n");
    for (i, t) in texts.iter().enumerate() {
        body.push_str(&format!("{i},\"{t}\"\n"));
    }
    std::fs::write(&csv_in, body).unwrap();
    let from_csv = json_lines(&run(&[
        "predict",
        "--model",
        model,
        "--json",
        "--input",
        csv_in.to_str().unwrap(),
        "--text-column",
        "review",
    ]));
    assert_eq!(from_csv, reference);

    // From standard input, one text per line, written as CSV.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
        .args(["predict", "--model", model, "--csv"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all((texts.join("\n") + "\n").as_bytes()).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut reader = csv::Reader::from_reader(o.stdout.as_slice());
    assert_eq!(reader.headers().unwrap(), vec!["text", "label", "probability_neg", "probability_pos"]);
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 32);
    for ((row, text), want) in rows.iter().zip(&texts).zip(&reference) {
        assert_eq!(&row[0], text);
        assert_eq!(want["label"], &row[1]);
        let p: f64 = row[3].parse().unwrap();
        assert!((p - want["probabilities"]["pos"].as_f64().unwrap()).abs() < 1e-12);
    }
}

#[test]
fn export_loads_in_transformers_with_the_same_logits() {
    let Some(python) = common::python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (out, o) = train_tiny(tmp.path());
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let texts = ["the movie was great, lovely.", "the movie was awful, dull.", "the movie was fine."];
    let mut args = vec!["predict", "--model", out.to_str().unwrap(), "--json"];
    args.extend(texts);
    let p = run(&args);
    assert!(p.status.success(), "{}", stderr(&p));
    let ours: Vec<Vec<f64>> = String::from_utf8_lossy(&p.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        })
        .collect();
    let script = r#"
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForSequenceClassification.from_pretrained(d).eval()
enc = tok(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    print(json.dumps({"logits": model(**enc).logits.tolist(), "labels": model.config.id2label}))
"#;
    let py = Command::new(python)
        .args(["-c", script, out.to_str().unwrap(), &serde_json::to_string(&texts).unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "transformers could not load the export: {}", stderr(&py));
    let theirs: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(theirs["labels"]["1"], "pos");
    for (i, row) in theirs["logits"].as_array().unwrap().iter().enumerate() {
        for (j, v) in row.as_array().unwrap().iter().enumerate() {
            let (a, b) = (ours[i][j], v.as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "text {i} logit {j}: ours {a} vs transformers {b}"
            );
        }
    }
}

/// Runs a failing command: exit code 1, one line on stderr containing `want`, no panic.
fn expect_error(args: &[&str], want: &str) {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?} should fail cleanly; stderr: {err}");
    assert!(err.contains(want), "{args:?}: expected {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line expected: {err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let data = tiny_data(tmp.path());
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            m,
            "--random-init",
            "--dataset",
            d,
            "--train-samples",
            "0",
            "--eval-samples",
            "0",
            "--max-length",
            "16",
            "--quiet",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let call = |extra: &[&str], want: &str| {
        let v = base(extra);
        let args: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        expect_error(&args, want);
    };
    call(&["--learning-rate", "0"], "--learning-rate must be a positive number");
    call(&["--learning-rate=-1e-5"], "--learning-rate must be a positive number");
    call(&["--batch-size", "0"], "--batch-size must be at least 1");
    call(&["--epochs", "0"], "--epochs must be at least 1");
    call(&["--weight-decay", "2"], "--weight-decay must be in [0, 1]");
    call(&["--max-length", "65"], "exceeds the model's max_position_embeddings 64");
    call(&["--train-samples", "1000"], "1000");
    call(&["--text-column", "review"], "review");
    call(&["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)");
    expect_error(&["train", "--model", "./does/not/exist", "--quiet"], "no such directory");

    // Model files that are broken in various ways.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), broken.join(f)).unwrap();
    }
    let b = broken.to_str().unwrap();
    let train_broken = |want: &str| {
        expect_error(
            &[
                "train",
                "--model",
                b,
                "--dataset",
                d,
                "--max-length",
                "16",
                "--quiet",
                "--train-samples",
                "0",
                "--eval-samples",
                "0",
            ],
            want,
        )
    };
    train_broken("no config.json");
    std::fs::write(
        broken.join("config.json"),
        "{\"vocab_size\": 32, \"hidden_size\": 16, \"num_attention_heads\": 3}",
    )
    .unwrap();
    train_broken("hidden_size 16 is not a multiple of num_attention_heads 3");
    std::fs::write(broken.join("config.json"), "{\"vocab_size\": 10, \"hidden_size\": 16, \"num_attention_heads\": 2, \"max_position_embeddings\": 64}").unwrap();
    train_broken("tokenizer and model do not match");
    std::fs::write(broken.join("config.json"), "{not json").unwrap();
    train_broken("invalid JSON");
    std::fs::copy(model.join("config.json"), broken.join("config.json")).unwrap();
    train_broken("no model.safetensors or pytorch_model.bin");
    std::fs::write(broken.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    train_broken("model.safetensors: the header claims 16 bytes but the file has only 5: truncated");

    // Data problems.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(data.join("test.jsonl"), bad.join("test.jsonl")).unwrap();
    let bd = bad.to_str().unwrap();
    let train_bad = |want: &str| {
        expect_error(
            &[
                "train",
                "--model",
                m,
                "--random-init",
                "--dataset",
                bd,
                "--max-length",
                "16",
                "--quiet",
                "--train-samples",
                "0",
                "--eval-samples",
                "0",
            ],
            want,
        )
    };
    std::fs::write(
        bad.join("train.jsonl"),
        b"{\"text\": \"ok\", \"label\": \"pos\"}\n{\"text\": \"\xff\xfe\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    train_bad("line 2");
    std::fs::write(
        bad.join("train.jsonl"),
        "{\"text\": \"ok\", \"label\": \"pos\"}\n{\"text\": \"fine\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    std::fs::write(bad.join("test.jsonl"), "{\"text\": \"ok\", \"label\": \"maybe\"}\n").unwrap();
    train_bad("maybe");
    std::fs::write(bad.join("test.jsonl"), "{\"text\": \"\", \"label\": \"pos\"}\n").unwrap();
    train_bad("empty");
}
