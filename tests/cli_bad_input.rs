//! Every bad input tried at the command line, in one table: each row sets up files in a fresh
//! temporary directory (whose name contains spaces), runs the real `hpo-gpu` binary and checks
//! the exit code, the exact error line, that nothing panicked, and that nothing on disk changed
//! (no half-written output, no new database, the study database intact with the same trials).
//!
//! The same table renders docs/cli-errors.md; `docs_match_the_case_table` fails when the file
//! differs, and `HPO_GPU_UPDATE_DOCS=1 cargo test --test cli_bad_input` rewrites it.
//! `HPO_GPU_CASE=id` runs one row.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use hpo_gpu::cli::study::{AskArgs, DirectionArg, SamplerKind, StudyArgs, TellArgs, run_ask, run_tell};
use hpo_gpu::config::BertConfig;
use hpo_gpu::model::BertModel;
use hpo_gpu::model::safetensors_io::save_safetensors;

/// One bad input. `args` start with the subcommand; `<tmp>` is the case's temporary directory,
/// and the tokens `@train`, `@train-data` and `@search` stand for [`TRAIN_BASE`], [`TRAIN_DATA`]
/// and [`SEARCH_BASE`].
struct Case {
    id: &'static str,
    /// What is wrong, in words.
    input: &'static str,
    /// Writes the case's own files into `<tmp>` (after the shared fixture).
    setup: fn(&Path),
    args: &'static [&'static str],
    /// 1: hpo-gpu's own error; 2: clap could not parse the flags; 0: must work.
    exit: i32,
    /// Exit 1: all of stderr, one line. Exit 2: the first line (clap adds usage lines). Exit 0:
    /// all of stderr (empty); the command must also print its result on stdout.
    stderr: &'static str,
}

/// A valid `train` run on the tiny model (random init) and data except for what a row adds
/// (later flags win).
const TRAIN_BASE: &[&str] = &["--model", "<tmp>/tiny-bert", "--random-init", "@train-data"];

/// [`TRAIN_BASE`] without the model, for rows about weights files.
const TRAIN_DATA: &[&str] = &[
    "--dataset",
    "<tmp>/data",
    "--train-samples",
    "0",
    "--eval-samples",
    "0",
    "--max-length",
    "16",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--quiet",
    "--output",
    "<tmp>/out",
];

/// A valid one-trial `search` continuing study `s` of `<tmp>/study.db`.
const SEARCH_BASE: &[&str] = &[
    "--model",
    "<tmp>/tiny-bert",
    "--random-init",
    "--dataset",
    "<tmp>/data",
    "--train-samples",
    "0",
    "--eval-samples",
    "0",
    "--max-length",
    "16",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--storage",
    "sqlite:///<tmp>/study.db",
    "--study-name",
    "s",
    "--n-trials",
    "3",
];

const STORAGE: &str = "sqlite:///<tmp>/study.db";

fn none(_: &Path) {}

/// `<tmp>/d/NAME` with `content` as the training split, beside the fixture's good test split.
fn train_file_beside_good_test(t: &Path, name: &str, content: impl AsRef<[u8]>) {
    write(t, &format!("d/{name}"), content);
    std::fs::copy(t.join("data/test.jsonl"), t.join("d/test.jsonl")).unwrap();
}

fn write(t: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = t.join(rel);
    std::fs::create_dir_all(p.parent().expect("a file inside the temporary directory")).unwrap();
    std::fs::write(p, content).unwrap();
}

/// `<tmp>/NAME` with the tiny model's config and tokenizer files.
fn copy_model(t: &Path, name: &str) -> PathBuf {
    let dir = t.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(t.join("tiny-bert").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Writes `dir/model.safetensors`: a random-init model of the tiny config with `vocab_size`
/// embedding rows, without the tensors `drop` names, with a NaN in the tensor `nan_in`.
fn save_weights(dir: &Path, vocab_size: usize, drop: &[&str], nan_in: Option<&str>) {
    let mut config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    config.vocab_size = vocab_size;
    let model = BertModel::random_init(&config, 0);
    let mut owned: Vec<(String, Vec<f32>, Vec<usize>)> = model
        .named_tensors()
        .filter(|(name, _, _)| !drop.contains(name))
        .map(|(name, shape, values)| (name.to_string(), values.to_vec(), shape.to_vec()))
        .collect();
    for (name, values, _) in &mut owned {
        if Some(name.as_str()) == nan_in {
            values[1] = f32::NAN;
        }
    }
    let tensors: Vec<(String, &[f32], Vec<usize>)> =
        owned.iter().map(|(n, v, s)| (n.clone(), v.as_slice(), s.clone())).collect();
    save_safetensors(&dir.join("model.safetensors"), &tensors, &Default::default()).unwrap();
}

/// The recipe's space in Optuna's JSON form (what `search` stores without `--space`).
const RECIPE_SPACE: &str = r#"{"learning_rate": {"name": "FloatDistribution", "attributes": {"low": 1e-06, "high": 0.0001, "log": true}},
 "per_device_train_batch_size": {"name": "CategoricalDistribution", "attributes": {"choices": [16, 32, 64, 128]}},
 "weight_decay": {"name": "FloatDistribution", "attributes": {"low": 0.0, "high": 0.3}}}"#;

/// `one.db` with the single study `only` (one trial).
fn one_study(t: &Path) {
    let storage = format!("sqlite:///{}", t.join("one.db").display());
    let study = StudyArgs { storage, study_name: "only".into() };
    let args = AskArgs {
        study,
        search_space: RECIPE_SPACE.into(),
        sampler: SamplerKind::Random,
        seed: Some(1),
        direction: Some(DirectionArg::Maximize),
        n: 1,
    };
    run_ask(&args, &mut Vec::new()).unwrap();
}

/// `none.db`: Optuna's schema without a study.
fn no_study(t: &Path) {
    hpo_gpu::study::storage::Storage::open(&format!("sqlite:///{}", t.join("none.db").display())).unwrap();
}

/// What every row starts from: `tiny-bert/` (config + tokenizer, random init only), `data/`
/// (train.jsonl, test.jsonl), `trained/` (tiny-bert plus model.safetensors with a classifier)
/// and `study.db` holding study `s` (maximize, the recipe's space, trials 0 and 1 COMPLETE,
/// trial 2 RUNNING) and study `empty` (no trials).
fn fixture(t: &Path) {
    common::tiny_model(t);
    common::tiny_data(t);
    let trained = copy_model(t, "trained");
    save_weights(&trained, 32, &[], None);
    let storage = STORAGE.replace("<tmp>", t.to_str().unwrap());
    let study = |name: &str| StudyArgs { storage: storage.clone(), study_name: name.into() };
    let ask = |name: &str, space: &str, n: usize| {
        let args = AskArgs {
            study: study(name),
            search_space: space.into(),
            sampler: SamplerKind::Random,
            seed: Some(7),
            direction: Some(DirectionArg::Maximize),
            n,
        };
        run_ask(&args, &mut Vec::new()).unwrap();
    };
    ask("s", RECIPE_SPACE, 3);
    ask("empty", "{}", 1);
    for (number, value) in [(0, 0.8), (1, 0.7)] {
        let args = TellArgs {
            study: study("s"),
            trial_number: number,
            values: vec![value],
            state: None,
            skip_if_finished: false,
        };
        run_tell(&args, &mut Vec::new()).unwrap();
    }
    // `ask` on "empty" made a trial; fail it so the study has no COMPLETE trial but stays valid.
    let args = TellArgs {
        study: study("empty"),
        trial_number: 0,
        values: vec![],
        state: Some(hpo_gpu::cli::study::TellState::Fail),
        skip_if_finished: false,
    };
    run_tell(&args, &mut Vec::new()).unwrap();
}

static CASES: &[Case] = &[
    // ----- train: flags -----
    Case {
        id: "train-epochs-zero",
        input: "zero epochs",
        setup: none,
        args: &["train", "@train", "--epochs", "0"],
        exit: 1,
        stderr: "error: --epochs must be at least 1",
    },
    Case {
        id: "train-epochs-negative",
        input: "negative epochs",
        setup: none,
        args: &["train", "@train", "--epochs", "-1"],
        exit: 2,
        stderr: "error: invalid value '-1' for '--epochs <EPOCHS>': invalid digit found in string",
    },
    Case {
        id: "train-epochs-not-a-number",
        input: "epochs not a number",
        setup: none,
        args: &["train", "@train", "--epochs", "three"],
        exit: 2,
        stderr: "error: invalid value 'three' for '--epochs <EPOCHS>': invalid digit found in string",
    },
    Case {
        id: "train-batch-size-zero",
        input: "batch size 0",
        setup: none,
        args: &["train", "@train", "--batch-size", "0"],
        exit: 1,
        stderr: "error: --batch-size must be at least 1",
    },
    Case {
        id: "train-learning-rate-nan",
        input: "learning rate NaN",
        setup: none,
        args: &["train", "@train", "--learning-rate", "NaN"],
        exit: 1,
        stderr: "error: --learning-rate must be a positive number, got NaN",
    },
    Case {
        id: "train-learning-rate-negative",
        input: "negative learning rate",
        setup: none,
        args: &["train", "@train", "--learning-rate", "-0.001"],
        exit: 1,
        stderr: "error: --learning-rate must be a positive number, got -0.001",
    },
    Case {
        id: "train-learning-rate-negative-exponent",
        input: "negative learning rate written with a signed exponent, as Python's repr prints it",
        setup: none,
        args: &["train", "@train", "--learning-rate", "-1e-05"],
        exit: 1,
        stderr: "error: --learning-rate must be a positive number, got -0.00001",
    },
    Case {
        id: "train-learning-rate-negative-leading-dot",
        input: "negative learning rate without a leading zero",
        setup: none,
        args: &["train", "@train", "--learning-rate", "-.5"],
        exit: 1,
        stderr: "error: --learning-rate must be a positive number, got -0.5",
    },
    Case {
        id: "train-learning-rate-minus-infinity",
        input: "learning rate -inf",
        setup: none,
        args: &["train", "@train", "--learning-rate", "-inf"],
        exit: 1,
        stderr: "error: --learning-rate must be a positive number, got -inf",
    },
    Case {
        id: "train-weight-decay-capital-exponent",
        input: "negative weight decay written -5E+3",
        setup: none,
        args: &["train", "@train", "--weight-decay", "-5E+3"],
        exit: 1,
        stderr: "error: --weight-decay must be in [0, 1], got -5000",
    },
    Case {
        id: "train-weight-decay-nan",
        input: "weight decay nan",
        setup: none,
        args: &["train", "@train", "--weight-decay", "nan"],
        exit: 1,
        stderr: "error: --weight-decay must be in [0, 1], got NaN",
    },
    Case {
        id: "train-weight-decay-negative",
        input: "negative weight decay",
        setup: none,
        args: &["train", "@train", "--weight-decay", "-1"],
        exit: 1,
        stderr: "error: --weight-decay must be in [0, 1], got -1",
    },
    Case {
        id: "train-dropout-out-of-range",
        input: "dropout 1.5",
        setup: none,
        args: &["train", "@train", "--hidden-dropout", "1.5"],
        exit: 1,
        stderr: "error: --hidden-dropout must be in [0, 1), got 1.5",
    },
    Case {
        id: "train-max-length-too-long",
        input: "--max-length above the model's max_position_embeddings",
        setup: none,
        args: &["train", "@train", "--max-length", "65"],
        exit: 1,
        stderr: "error: --max-length 65 exceeds the model's max_position_embeddings 64 (<tmp>/tiny-bert/config.json)",
    },
    Case {
        id: "train-max-length-one",
        input: "--max-length with no room for [CLS] and [SEP]",
        setup: none,
        args: &["train", "@train", "--max-length", "1"],
        exit: 1,
        stderr: "error: --max-length must be at least 2 ([CLS] and [SEP])",
    },
    Case {
        id: "train-device-unknown",
        input: "unknown device",
        setup: none,
        args: &["train", "@train", "--device", "tpu"],
        exit: 2,
        stderr: "error: invalid value 'tpu' for '--device <DEVICE>'",
    },
    Case {
        id: "train-precision-unknown",
        input: "unknown precision",
        setup: none,
        args: &["train", "@train", "--precision", "fp16"],
        exit: 2,
        stderr: "error: invalid value 'fp16' for '--precision <PRECISION>'",
    },
    Case {
        id: "train-threads-zero",
        input: "zero threads",
        setup: none,
        args: &["train", "@train", "--threads", "0"],
        exit: 1,
        stderr: "error: --threads must be at least 1",
    },
    Case {
        id: "train-threads-not-a-number",
        input: "--threads not a number",
        setup: none,
        args: &["train", "@train", "--threads", "many"],
        exit: 2,
        stderr: "error: invalid value 'many' for '--threads <THREADS>': invalid digit found in string",
    },
    Case {
        id: "train-unknown-flag",
        input: "a flag that does not exist",
        setup: none,
        args: &["train", "@train", "--learning_rate", "1e-5"],
        exit: 2,
        stderr: "error: unexpected argument '--learning_rate' found",
    },
    Case {
        id: "train-output-is-a-file",
        input: "--output is an existing file (checked before training)",
        setup: none,
        args: &["train", "@train", "--output", "<tmp>/data/train.jsonl"],
        exit: 1,
        stderr: "error: --output <tmp>/data/train.jsonl: exists and is not a directory",
    },
    // ----- train: model files -----
    Case {
        id: "model-dir-missing",
        input: "--model directory does not exist",
        setup: none,
        args: &["train", "@train", "--model", "<tmp>/no-such-model"],
        exit: 1,
        stderr: "error: --model <tmp>/no-such-model: no such directory",
    },
    Case {
        id: "model-is-a-file",
        input: "--model is a file",
        setup: none,
        args: &["train", "@train", "--model", "<tmp>/tiny-bert/config.json"],
        exit: 1,
        stderr: "error: --model <tmp>/tiny-bert/config.json: is a file; expected a model directory or a Hugging Face Hub id",
    },
    Case {
        id: "model-hub-id-offline",
        input: "--model a Hub id that is not cached, offline",
        setup: none,
        args: &["train", "@train", "--model", "nobody/no-such-model"],
        exit: 1,
        stderr: "error: config.json of model repo nobody/no-such-model: not in the local cache ($HF_HOME/hub = <tmp>/hf/hub) and HF_HUB_OFFLINE=1 forbids downloading",
    },
    Case {
        id: "config-missing",
        input: "model directory without config.json",
        setup: |t| write(t, "m/vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n"),
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m: no config.json in the model directory",
    },
    Case {
        id: "config-bad-json",
        input: "config.json is not valid JSON",
        setup: |t| write(&copy_model(t, "m"), "config.json", "{\"vocab_size\": 32,"),
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/config.json: invalid model config: invalid JSON: EOF while parsing a value at line 1 column 18",
    },
    Case {
        id: "config-not-an-object",
        input: "config.json is a JSON array",
        setup: |t| write(&copy_model(t, "m"), "config.json", "[32, 16]"),
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/config.json: invalid model config: expected a JSON object",
    },
    Case {
        id: "config-missing-vocab-size",
        input: "config.json without vocab_size",
        setup: |t| {
            write(&copy_model(t, "m"), "config.json", r#"{"hidden_size": 16, "num_attention_heads": 2}"#)
        },
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/config.json: invalid model config: missing vocab_size",
    },
    Case {
        id: "config-wrong-type",
        input: "config.json vocab_size is a string",
        setup: |t| write(&copy_model(t, "m"), "config.json", r#"{"vocab_size": "32"}"#),
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/config.json: invalid model config: unexpected field type: invalid type: string \"32\", expected usize",
    },
    Case {
        id: "config-heads-do-not-divide",
        input: "hidden_size not a multiple of num_attention_heads",
        setup: |t| {
            write(
                &copy_model(t, "m"),
                "config.json",
                r#"{"vocab_size": 32, "hidden_size": 16, "num_attention_heads": 3, "max_position_embeddings": 64}"#,
            )
        },
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/config.json: invalid model config: hidden_size 16 is not a multiple of num_attention_heads 3",
    },
    Case {
        id: "config-not-bert",
        input: "config.json of another architecture",
        setup: |t| {
            write(&copy_model(t, "m"), "config.json", r#"{"model_type": "roberta", "vocab_size": 32}"#)
        },
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/config.json: invalid model config: model_type is \"roberta\"; only BERT models (model_type \"bert\") are supported",
    },
    Case {
        id: "tokenizer-missing",
        input: "model directory without tokenizer files",
        setup: |t| {
            let m = copy_model(t, "m");
            std::fs::remove_file(m.join("vocab.txt")).unwrap();
        },
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m: no tokenizer.json or vocab.txt (pass --tokenizer PATH)",
    },
    Case {
        id: "tokenizer-flag-missing-file",
        input: "--tokenizer names a file that does not exist",
        setup: none,
        args: &["train", "@train", "--tokenizer", "<tmp>/no-tokenizer.json"],
        exit: 1,
        stderr: "error: <tmp>/no-tokenizer.json: cannot read: No such file or directory (os error 2)",
    },
    Case {
        id: "tokenizer-flag-unknown-file-type",
        input: "--tokenizer names a file that is neither tokenizer.json nor vocab.txt",
        setup: none,
        args: &["train", "@train", "--tokenizer", "<tmp>/data/train.jsonl"],
        exit: 1,
        stderr: "error: --tokenizer <tmp>/data/train.jsonl: not a tokenizer file; give a tokenizer.json, a WordPiece vocab.txt, or a folder holding one",
    },
    Case {
        id: "tokenizer-larger-than-vocab",
        input: "the tokenizer's ids exceed config.json's vocab_size",
        setup: |t| {
            let m = copy_model(t, "m");
            let config = std::fs::read_to_string(m.join("config.json")).unwrap();
            write(&m, "config.json", config.replace("\"vocab_size\": 32", "\"vocab_size\": 20"));
        },
        args: &["train", "@train", "--model", "<tmp>/m"],
        exit: 1,
        stderr: "error: <tmp>/m/vocab.txt: the tokenizer produces token ids up to 20 but <tmp>/m/config.json has vocab_size 20 (tokenizer and model do not match)",
    },
    Case {
        id: "weights-missing",
        input: "no weights file and no --random-init",
        setup: none,
        args: &["train", "--model", "<tmp>/tiny-bert", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/tiny-bert: no model.safetensors or pytorch_model.bin (use --random-init to start from the config alone)",
    },
    Case {
        id: "safetensors-empty",
        input: "model.safetensors is empty",
        setup: |t| write(&copy_model(t, "m"), "model.safetensors", ""),
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: truncated: 0 bytes, too short for the 8-byte header length",
    },
    Case {
        id: "safetensors-truncated",
        input: "model.safetensors cut off inside its header",
        setup: |t| {
            write(&copy_model(t, "m"), "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        },
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: the header claims 16 bytes but the file has only 5: truncated, or not a safetensors file",
    },
    Case {
        id: "safetensors-header-not-json",
        input: "model.safetensors header is not JSON",
        setup: |t| {
            write(&copy_model(t, "m"), "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
        },
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: invalid safetensors header: invalid JSON in header: expected ident at line 1 column 2",
    },
    Case {
        id: "safetensors-data-truncated",
        input: "model.safetensors cut off inside the tensor data",
        setup: |t| {
            let m = copy_model(t, "m");
            save_weights(&m, 32, &[], None);
            let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
            write(&m, "model.safetensors", &bytes[..bytes.len() - 100]);
        },
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: the tensor data in the header does not match the file's 29604 bytes: truncated, or extra bytes",
    },
    Case {
        id: "vocab-vs-embeddings",
        input: "config.json's vocab_size (32) differs from the embedding rows in the weights (40)",
        setup: |t| {
            let m = copy_model(t, "m");
            save_weights(&m, 40, &[], None);
        },
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: tensor \"bert.embeddings.word_embeddings.weight\" has shape [40, 16], but config.json implies [32, 16]",
    },
    Case {
        id: "weights-missing-tensor",
        input: "the weights lack the word embeddings",
        setup: |t| {
            let m = copy_model(t, "m");
            save_weights(&m, 32, &["bert.embeddings.word_embeddings.weight"], None);
        },
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: the checkpoint has no tensor \"bert.embeddings.word_embeddings.weight\" (nor its name without \"bert.\")",
    },
    Case {
        id: "weights-nan",
        input: "a weight is NaN",
        setup: |t| {
            let m = copy_model(t, "m");
            save_weights(&m, 32, &[], Some("bert.pooler.dense.weight"));
        },
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/model.safetensors: tensor \"bert.pooler.dense.weight\" holds a non-finite value at element 1",
    },
    Case {
        id: "pytorch-bin-garbage",
        input: "pytorch_model.bin is not a torch file",
        setup: |t| write(&copy_model(t, "m"), "pytorch_model.bin", "this is not a checkpoint"),
        args: &["train", "--model", "<tmp>/m", "@train-data"],
        exit: 1,
        stderr: "error: <tmp>/m/pytorch_model.bin: not a PyTorch checkpoint: it starts with bytes [74 68 69 73 20 69 73 20], expected a zip archive (50 4b 03 04) or torch's legacy pickle (80 02 8a 0a ...)",
    },
    // ----- train: data -----
    Case {
        id: "dataset-missing",
        input: "--dataset path does not exist",
        setup: none,
        args: &["train", "@train", "--dataset", "<tmp>/no-data"],
        exit: 1,
        stderr: "error: --dataset <tmp>/no-data: no such file or directory (and not a Hugging Face dataset id)",
    },
    Case {
        id: "dataset-hub-id-offline",
        input: "--dataset a Hub id that is not cached, offline",
        setup: none,
        args: &["train", "@train", "--dataset", "nobody/no-such-data"],
        exit: 1,
        stderr: "error: --dataset nobody/no-such-data: no such local file or directory, so tried the Hub: dataset repo nobody/no-such-data: not in the local cache ($HF_HOME/hub = <tmp>/hf/hub) and HF_HUB_OFFLINE=1 forbids listing it on the Hub",
    },
    Case {
        id: "eval-dataset-missing",
        input: "--eval-dataset path does not exist",
        setup: none,
        args: &["train", "@train", "--eval-dataset", "<tmp>/no-eval-data"],
        exit: 1,
        stderr: "error: --eval-dataset <tmp>/no-eval-data: no such file or directory (and not a Hugging Face dataset id)",
    },
    Case {
        id: "dataset-split-missing",
        input: "no file for the training split",
        setup: none,
        args: &["train", "@train", "--train-split", "validation"],
        exit: 1,
        stderr: "error: <tmp>/data: no data file for split \"validation\" (looked for validation.*, *_validation.*, *-validation.*, validation-*.* and validation/*); data files found: [\"test.jsonl\", \"train.jsonl\"]",
    },
    Case {
        id: "dataset-truncated-json",
        input: "train.jsonl cut off mid-line",
        setup: |t| {
            let text = std::fs::read_to_string(t.join("data/train.jsonl")).unwrap();
            train_file_beside_good_test(t, "train.jsonl", &text[..300]);
        },
        args: &["train", "@train", "--dataset", "<tmp>/d"],
        exit: 1,
        stderr: "error: <tmp>/d/train.jsonl: line 6: invalid JSON: EOF while parsing a string at line 1 column 24",
    },
    Case {
        id: "dataset-bad-utf8",
        input: "train.jsonl with bytes that are not UTF-8",
        setup: |t| {
            train_file_beside_good_test(
                t,
                "train.jsonl",
                b"{\"text\": \"a \xff\xfe b\", \"label\": \"pos\"}\n",
            );
        },
        args: &["train", "@train", "--dataset", "<tmp>/d"],
        exit: 1,
        stderr: "error: <tmp>/d/train.jsonl: line 1: invalid UTF-8 at byte 13 of the line",
    },
    Case {
        id: "dataset-empty",
        input: "train.jsonl is empty",
        setup: |t| {
            train_file_beside_good_test(t, "train.jsonl", "");
        },
        args: &["train", "@train", "--dataset", "<tmp>/d"],
        exit: 1,
        stderr: "error: <tmp>/d/train.jsonl: the dataset has no examples",
    },
    Case {
        id: "dataset-parquet-garbage",
        input: "train.parquet that is not parquet",
        setup: |t| {
            train_file_beside_good_test(t, "train.parquet", "PAR1 these are notes, not a parquet file PAR1");
        },
        args: &["train", "@train", "--dataset", "<tmp>/d"],
        exit: 1,
        stderr: "error: <tmp>/d/train.parquet: not a readable parquet file: EOF: Parquet file too small. Size is 45 but need 543517809",
    },
    Case {
        id: "dataset-parquet-stalling-footer",
        input: "train.parquet whose footer makes the parquet crate loop for minutes (2^31-entry boolean maps)",
        setup: |t| {
            train_file_beside_good_test(t, "train.parquet", common::parquet_with_stalling_footer(2));
        },
        args: &["train", "@train", "--dataset", "<tmp>/d"],
        exit: 1,
        stderr: "error: <tmp>/d/train.parquet: corrupt parquet metadata: the parquet reader made no progress for 5 s",
    },
    Case {
        id: "dataset-no-label-column",
        input: "rows without the label column",
        setup: |t| write(t, "rows.jsonl", "{\"text\": \"good\", \"lbl\": 1}\n"),
        args: &["train", "@train", "--dataset", "<tmp>/rows.jsonl"],
        exit: 1,
        stderr: "error: <tmp>/rows.jsonl: line 1: no label column \"label\"; the columns are [\"lbl\", \"text\"]",
    },
    Case {
        id: "dataset-no-text-column",
        input: "--text-column names a column the data lacks",
        setup: none,
        args: &["train", "@train", "--text-column", "review"],
        exit: 1,
        stderr: "error: <tmp>/data/train.jsonl: line 1: no text column \"review\"; the columns are [\"label\", \"text\"]",
    },
    Case {
        id: "dataset-csv-no-text-column",
        input: "a CSV whose text column has another name",
        setup: |t| write(t, "rows.csv", "sentence,label\nhello,1\nawful,0\n"),
        args: &["train", "@train", "--dataset", "<tmp>/rows.csv"],
        exit: 1,
        stderr: "error: <tmp>/rows.csv: line 1: no text column \"text\"; the columns are [\"sentence\", \"label\"]",
    },
    Case {
        id: "dataset-fractional-label",
        input: "a label that is a fraction",
        setup: |t| write(t, "rows.jsonl", "{\"text\": \"good\", \"label\": 7.5}\n"),
        args: &["train", "@train", "--dataset", "<tmp>/rows.jsonl"],
        exit: 1,
        stderr: "error: <tmp>/rows.jsonl: line 1: label 7.5 is not an integer class id",
    },
    Case {
        id: "dataset-label-not-in-labels",
        input: "a label that --labels does not list",
        setup: none,
        args: &["train", "@train", "--labels", "pos"],
        exit: 1,
        stderr: "error: <tmp>/data/train.jsonl: line 2: label \"neg\" is not one of the label names [\"pos\"]",
    },
    Case {
        id: "dataset-one-class",
        input: "training data with a single class",
        setup: |t| {
            write(
                t,
                "rows.jsonl",
                "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"fine\", \"label\": \"pos\"}\n",
            )
        },
        args: &["train", "@train", "--dataset", "<tmp>/rows.jsonl"],
        exit: 1,
        stderr: "error: <tmp>/rows.jsonl: the training data has 1 class(es); classification needs at least 2",
    },
    Case {
        id: "dataset-too-few-rows",
        input: "--train-samples larger than the data",
        setup: none,
        args: &["train", "@train", "--train-samples", "1000"],
        exit: 1,
        stderr: "error: <tmp>/data/train.jsonl: asked for 1000 examples but the dataset has only 64",
    },
    Case {
        id: "from-study-missing-study",
        input: "--from-study names a study that does not exist",
        setup: none,
        args: &["train", "@train", "--from-study", "nope", "--storage", STORAGE],
        exit: 1,
        stderr: "error: no study named \"nope\" in sqlite:///<tmp>/study.db (studies: s, empty)",
    },
    Case {
        id: "from-study-no-complete-trial",
        input: "--from-study names a study without a COMPLETE trial",
        setup: none,
        args: &["train", "@train", "--from-study", "empty", "--storage", STORAGE],
        exit: 1,
        stderr: "error: --from-study empty: the study has no COMPLETE trial yet",
    },
    Case {
        id: "from-study-missing-database",
        input: "--from-study with a database file that does not exist",
        setup: none,
        args: &["train", "@train", "--from-study", "s", "--storage", "sqlite:///<tmp>/nope.db"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/nope.db\": <tmp>/nope.db does not exist",
    },
    // ----- predict -----
    Case {
        id: "predict-model-missing",
        input: "--model directory does not exist",
        setup: none,
        args: &["predict", "--model", "<tmp>/no-such-model", "A fine film."],
        exit: 1,
        stderr: "error: --model <tmp>/no-such-model: no such directory",
    },
    Case {
        id: "predict-no-weights",
        input: "a model directory without weights",
        setup: none,
        args: &["predict", "--model", "<tmp>/tiny-bert", "A fine film."],
        exit: 1,
        stderr: "error: <tmp>/tiny-bert: no model.safetensors or pytorch_model.bin; predict needs trained weights (hpo-gpu train --output DIR writes them)",
    },
    Case {
        id: "predict-no-classifier",
        input: "weights without a trained classifier",
        setup: |t| {
            let m = copy_model(t, "m");
            save_weights(&m, 32, &["classifier.weight", "classifier.bias"], None);
        },
        args: &["predict", "--model", "<tmp>/m", "A fine film."],
        exit: 1,
        stderr: "error: <tmp>/m: has no trained classifier (classifier.weight is missing); train it first",
    },
    Case {
        id: "predict-max-length-too-long",
        input: "--max-length above max_position_embeddings",
        setup: none,
        args: &["predict", "--model", "<tmp>/trained", "--max-length", "100", "A fine film."],
        exit: 1,
        stderr: "error: --max-length 100 exceeds max_position_embeddings 64",
    },
    Case {
        id: "predict-no-texts",
        input: "no texts: none as arguments, no --input, empty standard input",
        setup: none,
        args: &["predict", "--model", "<tmp>/trained"],
        exit: 1,
        stderr: "error: no texts to classify: give them as arguments, with --input FILE, or on standard input (one per line)",
    },
    Case {
        id: "predict-input-without-text-column",
        input: "--input file without the text column",
        setup: |t| write(t, "reviews.jsonl", "{\"review\": \"A fine film.\"}\n"),
        args: &["predict", "--model", "<tmp>/trained", "--input", "<tmp>/reviews.jsonl"],
        exit: 1,
        stderr: "error: <tmp>/reviews.jsonl: line 1: no text column \"text\"; the columns are [\"review\"]",
    },
    Case {
        id: "predict-input-and-texts",
        input: "texts as arguments and --input",
        setup: none,
        args: &["predict", "--model", "<tmp>/trained", "--input", "<tmp>/data/test.jsonl", "A fine film."],
        exit: 2,
        stderr: "error: the argument '--input <INPUT>' cannot be used with '[TEXTS]...'",
    },
    Case {
        id: "predict-negative-number-text",
        input: "a text that looks like a negative number must be classified",
        setup: none,
        args: &["predict", "--model", "<tmp>/trained", "-5"],
        exit: 0,
        stderr: "",
    },
    // ----- search: space files -----
    Case {
        id: "space-invalid-toml",
        input: "space file is not valid TOML",
        setup: |t| write(t, "space.toml", "[learning_rate]\ntype = \"float\"\nlow = [\n"),
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: <tmp>/space.toml: invalid TOML: line 3, column 8: unclosed array, expected `]`",
    },
    Case {
        id: "space-invalid-json",
        input: "space file is not valid JSON",
        setup: |t| write(t, "space.json", "{\"learning_rate\": "),
        args: &["search", "@search", "--space", "<tmp>/space.json"],
        exit: 1,
        stderr: "error: <tmp>/space.json: invalid JSON: EOF while parsing a value at line 1 column 18",
    },
    Case {
        id: "space-low-above-high",
        input: "low > high",
        setup: |t| write(t, "space.toml", "[learning_rate]\ntype = \"float\"\nlow = 1e-3\nhigh = 1e-5\n"),
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: <tmp>/space.toml: parameter \"learning_rate\": `low <= high` must hold, got low=0.001, high=1e-05",
    },
    Case {
        id: "space-log-low-zero",
        input: "log = true with low = 0",
        setup: |t| {
            write(t, "space.toml", "[learning_rate]\ntype = \"float\"\nlow = 0\nhigh = 1e-3\nlog = true\n")
        },
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: <tmp>/space.toml: parameter \"learning_rate\": `low > 0` must hold for log=true, got low=0.0, high=0.001",
    },
    Case {
        id: "space-unknown-distribution",
        input: "unknown distribution type",
        setup: |t| write(t, "space.toml", "[learning_rate]\ntype = \"gaussian\"\nlow = 0\nhigh = 1\n"),
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: <tmp>/space.toml: parameter \"learning_rate\": unknown type \"gaussian\" (expected float, int or categorical)",
    },
    Case {
        id: "space-empty-categorical",
        input: "categorical with no choices",
        setup: |t| {
            write(t, "space.toml", "[per_device_train_batch_size]\ntype = \"categorical\"\nchoices = []\n")
        },
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: <tmp>/space.toml: parameter \"per_device_train_batch_size\": `choices` must contain one or more elements",
    },
    Case {
        id: "space-unknown-parameter",
        input: "a parameter the trainer does not have",
        setup: |t| write(t, "space.toml", "[momentum]\ntype = \"float\"\nlow = 0\nhigh = 1\n"),
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: <tmp>/space.toml: unknown parameter \"momentum\"; the trainer's hyperparameters are: learning_rate, per_device_train_batch_size, weight_decay, num_train_epochs, warmup_ratio, warmup_steps, hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout, seed, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm, max_length",
    },
    Case {
        id: "space-wrong-extension",
        input: "space file neither .toml nor .json",
        setup: |t| write(t, "space.yaml", "learning_rate: 1\n"),
        args: &["search", "@search", "--space", "<tmp>/space.yaml"],
        exit: 1,
        stderr: "error: <tmp>/space.yaml: search space files must end in .toml or .json",
    },
    Case {
        id: "space-file-missing",
        input: "space file does not exist",
        setup: none,
        args: &["search", "@search", "--space", "<tmp>/no-space.toml"],
        exit: 1,
        stderr: "error: <tmp>/no-space.toml: cannot read search space file: No such file or directory (os error 2)",
    },
    Case {
        id: "space-differs-from-study",
        input: "--space makes learning_rate categorical; the study stored it as a float",
        setup: |t| {
            write(t, "space.toml", "[learning_rate]\ntype = \"categorical\"\nchoices = [1e-5, 2e-5]\n")
        },
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: --space <tmp>/space.toml does not match study \"s\" in sqlite:///<tmp>/study.db: parameter \"learning_rate\": the study already uses a FloatDistribution and cannot switch to a CategoricalDistribution",
    },
    Case {
        id: "space-log-differs-from-study",
        input: "--space drops log = true from learning_rate",
        setup: |t| write(t, "space.toml", "[learning_rate]\ntype = \"float\"\nlow = 1e-6\nhigh = 1e-4\n"),
        args: &["search", "@search", "--space", "<tmp>/space.toml"],
        exit: 1,
        stderr: "error: --space <tmp>/space.toml does not match study \"s\" in sqlite:///<tmp>/study.db: parameter \"learning_rate\": the study already uses {\"name\": \"FloatDistribution\", \"attributes\": {\"step\": null, \"low\": 1e-06, \"high\": 0.0001, \"log\": true}} and cannot change its log setting",
    },
    // ----- search: study flags and storage -----
    Case {
        id: "search-direction-differs",
        input: "--direction opposite to the stored study's",
        setup: none,
        args: &["search", "@search", "--direction", "minimize"],
        exit: 1,
        stderr: "error: study \"s\" in sqlite:///<tmp>/study.db has direction MAXIMIZE, not MINIMIZE",
    },
    Case {
        id: "search-precision-unknown",
        input: "unknown precision",
        setup: none,
        args: &["search", "@search", "--precision", "fp16"],
        exit: 2,
        stderr: "error: invalid value 'fp16' for '--precision <PRECISION>'",
    },
    Case {
        id: "search-n-trials-zero",
        input: "zero trials",
        setup: none,
        args: &["search", "@search", "--n-trials", "0"],
        exit: 1,
        stderr: "error: --n-trials must be at least 1",
    },
    Case {
        id: "search-timeout-negative",
        input: "negative timeout",
        setup: none,
        args: &["search", "@search", "--timeout", "-5"],
        exit: 1,
        stderr: "error: --timeout must be a positive number of seconds, got -5",
    },
    Case {
        id: "search-heartbeat-zero",
        input: "heartbeat interval 0",
        setup: none,
        args: &["search", "@search", "--heartbeat-interval", "0"],
        exit: 1,
        stderr: "error: --heartbeat-interval must be a positive number of seconds, got 0",
    },
    Case {
        id: "search-grace-not-longer-than-heartbeat",
        input: "grace period not longer than the heartbeat interval",
        setup: none,
        args: &["search", "@search", "--heartbeat-interval", "5", "--grace-period", "5"],
        exit: 1,
        stderr: "error: --grace-period (5 s) must be longer than --heartbeat-interval (5 s), or live trials would be taken for crashed ones",
    },
    Case {
        id: "search-percentile-out-of-range",
        input: "pruner percentile 150",
        setup: none,
        args: &["search", "@search", "--pruner", "percentile", "--pruner-percentile", "150"],
        exit: 1,
        stderr: "error: --pruner-percentile: percentile must be between 0 and 100 inclusive, got 150",
    },
    Case {
        id: "search-unknown-sampler",
        input: "unknown sampler",
        setup: none,
        args: &["search", "@search", "--sampler", "grid"],
        exit: 2,
        stderr: "error: invalid value 'grid' for '--sampler <SAMPLER>'",
    },
    Case {
        id: "search-slots-zero",
        input: "a trial array of 0 slots",
        setup: none,
        args: &["search", "@search", "--slots", "0"],
        exit: 1,
        stderr: "error: --slots must be at least 1",
    },
    Case {
        id: "search-micro-batch-zero",
        input: "micro-batch 0",
        setup: none,
        args: &["search", "@search", "--slots", "2", "--micro-batch", "0"],
        exit: 1,
        stderr: "error: --micro-batch must be at least 1",
    },
    Case {
        id: "search-micro-batch-without-array",
        input: "--micro-batch without a trial array",
        setup: none,
        args: &["search", "@search", "--micro-batch", "8"],
        exit: 1,
        stderr: "error: --micro-batch applies to the trial array: use it with --slots 2 or more",
    },
    Case {
        id: "search-micro-batch-not-dividing",
        input: "micro-batch that does not divide a batch size the search can choose",
        setup: none,
        args: &["search", "@search", "--slots", "2", "--micro-batch", "24"],
        exit: 1,
        stderr: "error: --micro-batch 24 does not divide the batch size 16: every batch size the search can choose must be a multiple of the micro-batch size",
    },
    Case {
        id: "storage-postgres-unreachable",
        input: "a PostgreSQL server nobody listens for",
        setup: none,
        args: &["search", "@search", "--storage", "postgresql://user:secret@127.0.0.1:1/optuna"],
        exit: 1,
        stderr: "error: --storage \"postgresql://user:***@127.0.0.1:1/optuna\": cannot connect to PostgreSQL: Connection refused (os error 111)",
    },
    Case {
        id: "storage-directory-missing",
        input: "database in a directory that does not exist",
        setup: none,
        args: &["search", "@search", "--storage", "sqlite:///<tmp>/no/such/dir/study.db"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/no/such/dir/study.db\": directory <tmp>/no/such/dir does not exist",
    },
    Case {
        id: "storage-directory-is-a-file",
        input: "database under a path that is a file (cannot be written)",
        setup: none,
        args: &["search", "@search", "--storage", "sqlite:///<tmp>/data/train.jsonl/study.db"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/data/train.jsonl/study.db\": <tmp>/data/train.jsonl is not a directory",
    },
    Case {
        id: "storage-not-sqlite",
        input: "the database file is not SQLite",
        setup: |t| write(t, "notes.db", "these are notes, not a database; ".repeat(10)),
        args: &["search", "@search", "--storage", "sqlite:///<tmp>/notes.db"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/notes.db\": <tmp>/notes.db is not an SQLite database",
    },
    Case {
        id: "search-bad-data-creates-no-study",
        input: "bad data with a new database: no database is created",
        setup: |t| write(t, "rows.jsonl", "{\"text\": \"good\"}\n"),
        args: &["search", "@search", "--dataset", "<tmp>/rows.jsonl", "--storage", "sqlite:///<tmp>/new.db"],
        exit: 1,
        stderr: "error: <tmp>/rows.jsonl: line 1: no label column \"label\"; the columns are [\"text\"]",
    },
    // ----- ask -----
    Case {
        id: "ask-space-invalid-json",
        input: "--search-space is not JSON",
        setup: none,
        args: &["ask", "--storage", STORAGE, "--study-name", "s", "--search-space", "{learning_rate: 1}"],
        exit: 1,
        stderr: "error: --search-space: invalid JSON: key must be a string at line 1 column 2",
    },
    Case {
        id: "ask-space-not-a-distribution",
        input: "--search-space parameter is not a distribution",
        setup: none,
        args: &["ask", "--storage", STORAGE, "--study-name", "s", "--search-space", r#"{"x": 1}"#],
        exit: 1,
        stderr: "error: --search-space: parameter \"x\": a distribution must be a JSON object",
    },
    Case {
        id: "ask-new-study-without-direction",
        input: "a study that does not exist, without --direction",
        setup: none,
        args: &["ask", "--storage", STORAGE, "--study-name", "new", "--search-space", "{}"],
        exit: 1,
        stderr: "error: pass --direction minimize|maximize to create the study: no study named \"new\" in sqlite:///<tmp>/study.db (studies: s, empty)",
    },
    Case {
        id: "ask-missing-database",
        input: "a database file that does not exist, without --direction",
        setup: none,
        args: &["ask", "--storage", "sqlite:///<tmp>/nope.db", "--study-name", "s", "--search-space", "{}"],
        exit: 1,
        stderr: "error: pass --direction minimize|maximize to create the study: --storage \"sqlite:///<tmp>/nope.db\": <tmp>/nope.db does not exist",
    },
    Case {
        id: "ask-n-zero",
        input: "--n 0",
        setup: none,
        args: &["ask", "--storage", STORAGE, "--study-name", "s", "--search-space", "{}", "--n", "0"],
        exit: 1,
        stderr: "error: --n must be at least 1",
    },
    Case {
        id: "ask-direction-differs",
        input: "--direction opposite to the stored study's",
        setup: none,
        args: &[
            "ask",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--search-space",
            "{}",
            "--direction",
            "minimize",
        ],
        exit: 1,
        stderr: "error: study \"s\" in sqlite:///<tmp>/study.db has direction MAXIMIZE, not MINIMIZE",
    },
    Case {
        id: "ask-space-differs-from-study",
        input: "--search-space makes learning_rate categorical; no trial is created",
        setup: none,
        args: &[
            "ask",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--search-space",
            r#"{"learning_rate": {"name": "CategoricalDistribution", "attributes": {"choices": [1e-5, 2e-5]}}}"#,
        ],
        exit: 1,
        stderr: "error: --search-space does not match study \"s\" in sqlite:///<tmp>/study.db: parameter \"learning_rate\": the study already uses a FloatDistribution and cannot switch to a CategoricalDistribution",
    },
    Case {
        id: "ask-path-with-spaces",
        input: "a storage path with spaces creates the study",
        setup: |t| std::fs::create_dir_all(t.join("my studies")).unwrap(),
        args: &[
            "ask",
            "--storage",
            "sqlite:///<tmp>/my studies/study one.db",
            "--study-name",
            "study one",
            "--search-space",
            "{}",
            "--direction",
            "minimize",
        ],
        exit: 0,
        stderr: "",
    },
    // ----- tell -----
    Case {
        id: "tell-missing-study",
        input: "a study that does not exist",
        setup: none,
        args: &[
            "tell",
            "--storage",
            STORAGE,
            "--study-name",
            "nope",
            "--trial-number",
            "2",
            "--values",
            "0.5",
        ],
        exit: 1,
        stderr: "error: no study named \"nope\" in sqlite:///<tmp>/study.db (studies: s, empty)",
    },
    Case {
        id: "tell-missing-database",
        input: "a database file that does not exist (none is created)",
        setup: none,
        args: &[
            "tell",
            "--storage",
            "sqlite:///<tmp>/nope.db",
            "--study-name",
            "s",
            "--trial-number",
            "0",
            "--values",
            "0.5",
        ],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/nope.db\": <tmp>/nope.db does not exist",
    },
    Case {
        id: "tell-missing-trial",
        input: "a trial number the study does not have",
        setup: none,
        args: &["tell", "--storage", STORAGE, "--study-name", "s", "--trial-number", "99", "--values", "0.5"],
        exit: 1,
        stderr: "error: study \"s\" has no trial number 99",
    },
    Case {
        id: "tell-finished-trial",
        input: "a trial that is already COMPLETE",
        setup: none,
        args: &["tell", "--storage", STORAGE, "--study-name", "s", "--trial-number", "0", "--values", "0.5"],
        exit: 1,
        stderr: "error: cannot tell trial 0: it is already COMPLETE",
    },
    Case {
        id: "tell-no-value",
        input: "completing a trial without a value",
        setup: none,
        args: &["tell", "--storage", STORAGE, "--study-name", "s", "--trial-number", "2"],
        exit: 1,
        stderr: "error: --values is required to complete a trial",
    },
    Case {
        id: "tell-two-values",
        input: "two values for a single-objective study",
        setup: none,
        args: &[
            "tell",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--trial-number",
            "2",
            "--values",
            "0.5",
            "-0.25",
        ],
        exit: 1,
        stderr: "error: --values: the study has one objective, got 2 values",
    },
    Case {
        id: "tell-pruned-with-value",
        input: "--state pruned with a value",
        setup: none,
        args: &[
            "tell",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--trial-number",
            "2",
            "--state",
            "pruned",
            "--values",
            "0.5",
        ],
        exit: 1,
        stderr: "error: --values must be omitted with --state pruned or fail",
    },
    Case {
        id: "tell-value-not-a-number",
        input: "a value that is not a number",
        setup: none,
        args: &["tell", "--storage", STORAGE, "--study-name", "s", "--trial-number", "2", "--values", "high"],
        exit: 2,
        stderr: "error: invalid value 'high' for '--values <VALUES>...': invalid float literal",
    },
    Case {
        id: "tell-negative-value",
        input: "a negative value must be accepted",
        setup: none,
        args: &["tell", "--storage", STORAGE, "--study-name", "s", "--trial-number", "2", "--values", "-0.5"],
        exit: 0,
        stderr: "",
    },
    Case {
        id: "tell-negative-exponent-value",
        input: "a negative value as Python's repr prints it must be accepted",
        setup: none,
        args: &[
            "tell",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--trial-number",
            "2",
            "--values",
            "-1.084750655768679e-05",
        ],
        exit: 0,
        stderr: "",
    },
    Case {
        id: "tell-two-signed-exponent-values",
        input: "two negative values with signed exponents: both are values, one objective",
        setup: none,
        args: &[
            "tell",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--trial-number",
            "2",
            "--values",
            "-1e-05",
            "-2E+3",
        ],
        exit: 1,
        stderr: "error: --values: the study has one objective, got 2 values",
    },
    // ----- trials / best -----
    Case {
        id: "trials-in-memory-storage",
        input: "an in-memory database (always empty)",
        setup: none,
        args: &["trials", "--storage", "sqlite:///:memory:", "--study-name", "s"],
        exit: 1,
        stderr: "error: no study named \"s\" in sqlite:///:memory: (the storage has no studies)",
    },
    Case {
        id: "trials-missing-study",
        input: "a study that does not exist",
        setup: none,
        args: &["trials", "--storage", STORAGE, "--study-name", "nope"],
        exit: 1,
        stderr: "error: no study named \"nope\" in sqlite:///<tmp>/study.db (studies: s, empty)",
    },
    Case {
        id: "trials-missing-database",
        input: "a database file that does not exist (none is created)",
        setup: none,
        args: &["trials", "--storage", "sqlite:///<tmp>/nope.db", "--study-name", "s"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/nope.db\": <tmp>/nope.db does not exist",
    },
    Case {
        id: "trials-storage-is-a-directory",
        input: "the database path is a directory",
        setup: none,
        args: &["trials", "--storage", "sqlite:///<tmp>/data", "--study-name", "s"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///<tmp>/data\": <tmp>/data is a directory, not a database file",
    },
    Case {
        id: "trials-malformed-url",
        input: "sqlite:// with two slashes",
        setup: none,
        args: &["trials", "--storage", "sqlite://study.db", "--study-name", "s"],
        exit: 1,
        stderr: "error: --storage \"sqlite://study.db\": malformed SQLite URL (expected sqlite:///RELATIVE/PATH.db, sqlite:////ABSOLUTE/PATH.db or postgresql://USER:PASSWORD@HOST:PORT/DATABASE)",
    },
    Case {
        id: "trials-plain-path",
        input: "a file path instead of a URL",
        setup: none,
        args: &["trials", "--storage", "study.db", "--study-name", "s"],
        exit: 1,
        stderr: "error: --storage \"study.db\": not a storage URL (expected sqlite:///RELATIVE/PATH.db, sqlite:////ABSOLUTE/PATH.db or postgresql://USER:PASSWORD@HOST:PORT/DATABASE, e.g. sqlite:///study.db)",
    },
    Case {
        id: "best-no-complete-trial",
        input: "a study without a COMPLETE trial",
        setup: none,
        args: &["best", "--storage", STORAGE, "--study-name", "empty"],
        exit: 1,
        stderr: "error: study \"empty\" has no COMPLETE trial yet",
    },
    Case {
        id: "best-no-study-name-several-studies",
        input: "no --study-name in a database with several studies",
        setup: none,
        args: &["best", "--storage", STORAGE],
        exit: 1,
        stderr: "error: sqlite:///<tmp>/study.db holds 2 studies (s, empty); name one with --study-name",
    },
    Case {
        id: "trials-no-study-name-one-study",
        input: "no --study-name in a database with one study: that study",
        setup: one_study,
        args: &["trials", "--storage", "sqlite:///<tmp>/one.db"],
        exit: 0,
        stderr: "",
    },
    Case {
        id: "trials-no-study-name-no-study",
        input: "no --study-name in a database without studies",
        setup: no_study,
        args: &["trials", "--storage", "sqlite:///<tmp>/none.db"],
        exit: 1,
        stderr: "error: sqlite:///<tmp>/none.db holds no study yet (hpo-gpu search creates one)",
    },
    // ----- plot / report / importance -----
    Case {
        id: "plot-missing-study",
        input: "a study that does not exist",
        setup: none,
        args: &["plot", "--storage", STORAGE, "--study-name", "nope", "--out", "<tmp>/plots"],
        exit: 1,
        stderr: "error: no study named \"nope\" in sqlite:///<tmp>/study.db (studies: s, empty)",
    },
    Case {
        id: "plot-missing-database",
        input: "the recipe's default database does not exist here (none is created)",
        setup: none,
        args: &["plot", "--out", "<tmp>/plots"],
        exit: 1,
        stderr: "error: --storage \"sqlite:///optuna_trials.db\": optuna_trials.db does not exist",
    },
    Case {
        id: "plot-out-is-a-file",
        input: "--out is a file",
        setup: none,
        args: &["plot", "--storage", STORAGE, "--study-name", "s", "--out", "<tmp>/data/train.jsonl"],
        exit: 1,
        stderr: "error: --out <tmp>/data/train.jsonl: exists and is not a directory",
    },
    Case {
        id: "report-out-is-a-directory",
        input: "--out is a directory",
        setup: none,
        args: &["report", "--storage", STORAGE, "--study-name", "s", "--out", "<tmp>/data"],
        exit: 1,
        stderr: "error: --out <tmp>/data: is a directory; give the path of the HTML file to write",
    },
    Case {
        id: "report-out-under-a-file",
        input: "--out inside a path that is a file",
        setup: none,
        args: &[
            "report",
            "--storage",
            STORAGE,
            "--study-name",
            "s",
            "--out",
            "<tmp>/data/train.jsonl/report.html",
        ],
        exit: 1,
        stderr: "error: --out <tmp>/data/train.jsonl/report.html: <tmp>/data/train.jsonl is a file, not a directory",
    },
    Case {
        id: "report-unsupported-storage",
        input: "a MySQL URL",
        setup: none,
        args: &["report", "--storage", "mysql://host/optuna", "--study-name", "s", "--out", "<tmp>/r.html"],
        exit: 1,
        stderr: "error: --storage \"mysql://host/optuna\": unsupported database \"mysql\"; hpo-gpu stores studies in SQLite or PostgreSQL (expected sqlite:///RELATIVE/PATH.db, sqlite:////ABSOLUTE/PATH.db or postgresql://USER:PASSWORD@HOST:PORT/DATABASE)",
    },
    Case {
        id: "importance-missing-study",
        input: "a study that does not exist",
        setup: none,
        args: &["importance", "--storage", STORAGE, "--study-name", "nope"],
        exit: 1,
        stderr: "error: no study named \"nope\" in sqlite:///<tmp>/study.db (studies: s, empty)",
    },
    Case {
        id: "importance-unknown-evaluator",
        input: "unknown evaluator",
        setup: none,
        args: &["importance", "--storage", STORAGE, "--study-name", "s", "--evaluator", "shap"],
        exit: 2,
        stderr: "error: invalid value 'shap' for '--evaluator <EVALUATOR>'",
    },
    // ----- push -----
    Case {
        id: "push-no-token",
        input: "no Hugging Face token",
        setup: none,
        args: &["push", "<tmp>/trained", "--repo-id", "someone/tiny-bert"],
        exit: 1,
        stderr: "error: no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (hpo-gpu reads the token file it writes); --dry-run needs none",
    },
    Case {
        id: "push-missing-dir",
        input: "a model folder that does not exist",
        setup: none,
        args: &["push", "<tmp>/no-model", "--repo-id", "someone/tiny-bert", "--dry-run"],
        exit: 1,
        stderr: "error: <tmp>/no-model: cannot read the model folder: No such file or directory (os error 2)",
    },
    Case {
        id: "push-bad-repo-id",
        input: "--repo-id without an owner",
        setup: none,
        args: &["push", "<tmp>/trained", "--repo-id", "tiny-bert", "--dry-run"],
        exit: 1,
        stderr: "error: --repo-id \"tiny-bert\": expected OWNER/NAME (letters, digits, '-', '_', '.'; e.g. alice/minilm-imdb)",
    },
    Case {
        id: "push-missing-repo-id",
        input: "no --repo-id",
        setup: none,
        args: &["push", "<tmp>/trained"],
        exit: 2,
        stderr: "error: the following required arguments were not provided:",
    },
];

/// `args` with the `@` tokens expanded and `<tmp>` replaced.
fn expand(args: &[&str], tmp: &str) -> Vec<String> {
    let mut out = Vec::new();
    for a in args {
        match *a {
            "@train" => out.extend(expand(TRAIN_BASE, tmp)),
            "@train-data" => out.extend(expand(TRAIN_DATA, tmp)),
            "@search" => out.extend(SEARCH_BASE.iter().map(|s| s.replace("<tmp>", tmp))),
            other => out.push(other.replace("<tmp>", tmp)),
        }
    }
    out
}

/// Every file and directory under `root` with its content (directories as ""). SQLite's `-wal`
/// and `-shm` side files come and go with connections and are left out; databases are compared
/// by their rows ([`db_dump`]) instead of their bytes.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel.ends_with("-wal") || rel.ends_with("-shm") {
                continue;
            }
            if path.is_dir() {
                out.insert(rel + "/", Vec::new());
                stack.push(path);
            } else if rel.ends_with(".db") {
                out.insert(rel, db_dump(&path).into_bytes());
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// `PRAGMA integrity_check` plus every row of every table, as text.
fn db_dump(path: &Path) -> String {
    let conn = match rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(c) => c,
        Err(e) => return format!("cannot open: {e}"),
    };
    let mut dump = String::new();
    let check: rusqlite::Result<String> = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0));
    match check {
        Ok(c) => dump.push_str(&format!("integrity_check: {c}\n")),
        Err(e) => return format!("not a database: {e}"),
    }
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    for table in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid")).unwrap();
        let n = stmt.column_count();
        let rows: Vec<String> = stmt
            .query_map([], |r| {
                let cells: Vec<String> = (0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).map(|v| format!("{v:?}")).unwrap_or_default()))
                    .collect();
                Ok(cells.join(", "))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        dump.push_str(&format!("{table}: {}\n", rows.join(" | ")));
    }
    dump
}

/// Runs one row; returns what went wrong, if anything.
fn run_case(case: &Case) -> Result<(), String> {
    let dir = tempfile::Builder::new().prefix("bad input ").tempdir().map_err(|e| e.to_string())?;
    let t = dir.path();
    let tmp = t.to_str().ok_or("temporary directory is not UTF-8")?;
    fixture(t);
    (case.setup)(t);
    let before = tree(t);
    let study_before = db_dump(&t.join("study.db"));
    let args = expand(case.args, tmp);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hpo-gpu"))
        .args(&args)
        .current_dir(t)
        // The Hub must not be reached, nor the user's cache or token read.
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", t.join("hf"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT")
        .env_remove("XDG_CACHE_HOME")
        .output()
        .map_err(|e| format!("cannot run hpo-gpu: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr).replace(tmp, "<tmp>");
    let stdout = String::from_utf8_lossy(&output.stdout).replace(tmp, "<tmp>");
    let mut problems = Vec::new();
    if stderr.contains("panicked") || stdout.contains("panicked") {
        problems.push("panicked".to_string());
    }
    if output.status.code() != Some(case.exit) {
        problems.push(format!("exit code {:?}, expected {}", output.status.code(), case.exit));
    }
    let shown = match case.exit {
        2 => stderr.lines().next().unwrap_or_default().to_string(),
        _ => stderr.strip_suffix('\n').unwrap_or(&stderr).to_string(),
    };
    if shown != case.stderr {
        problems.push(format!("stderr\n     got: {shown}\n    want: {}", case.stderr));
    }
    if case.exit != 0 {
        if !stdout.is_empty() {
            problems.push(format!("printed on stdout: {stdout}"));
        }
        let after = tree(t);
        let changed: Vec<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !changed.is_empty() {
            problems.push(format!("files created, changed or removed: {changed:?}"));
        }
    }
    if case.exit == 0 && stdout.is_empty() {
        problems.push("printed nothing on stdout".to_string());
    }
    let study_after = db_dump(&t.join("study.db"));
    if !study_after.starts_with("integrity_check: ok\n") {
        problems.push(format!("study.db is damaged: {study_after}"));
    } else if case.exit != 0 && study_after != study_before {
        problems.push(format!("study.db changed:\n{study_before}\n=>\n{study_after}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}\n  args: {:?}\n  {}", case.id, case.input, case.args, problems.join("\n  ")))
    }
}

#[test]
fn every_bad_input_gives_its_one_line_error() {
    let only = std::env::var("HPO_GPU_CASE").ok();
    let cases: Vec<&Case> = CASES.iter().filter(|c| only.as_deref().is_none_or(|id| c.id == id)).collect();
    assert!(!cases.is_empty(), "no case named {only:?}");
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = run_case(case) {
                        failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_case_table_is_well_formed() {
    let mut ids = std::collections::HashSet::new();
    for c in CASES {
        assert!(ids.insert(c.id), "duplicate id {}", c.id);
        assert!(matches!(c.exit, 0..=2), "{}: exit {}", c.id, c.exit);
        if c.exit == 0 {
            assert!(c.stderr.is_empty(), "{}: a working command prints no error", c.id);
        } else {
            assert!(c.stderr.starts_with("error: ") && !c.stderr.contains('\n'), "{}: {:?}", c.id, c.stderr);
        }
    }
    assert!(CASES.len() >= 40, "only {} rows", CASES.len());
}

/// Quotes an argument the way a shell user would type it.
fn shell_word(a: &str) -> String {
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=<>@,".contains(c)) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// A Markdown code span inside a table cell.
fn code(text: &str) -> String {
    let text = text.replace('|', r"\|");
    if text.contains('`') { format!("`` {text} ``") } else { format!("`{text}`") }
}

fn render_docs() -> String {
    let mut doc = String::from(
        "# Bad input at the command line\n\n\
         Every bad input we tried, and the exact error `hpo-gpu` prints. Generated from the case table in\n\
         `tests/cli_bad_input.rs`, where every row is a test that runs the real binary and checks the exit\n\
         code, this exact line, that nothing panicked and that nothing on disk changed (no output written,\n\
         no database created, the study database intact with the same trials). Regenerate with\n\
         `HPO_GPU_UPDATE_DOCS=1 cargo test --test cli_bad_input`.\n\n\
         - Exit code 1: hpo-gpu's own error, always one line `error: …` naming the file or flag and the problem.\n\
         - Exit code 2: a flag the parser could not read; the first line is shown, usage lines follow it.\n\
         - Exit code 0: inputs that look odd but must work.\n\
         - `<tmp>` is the test's temporary directory; its name contains spaces, so every row also checks\n\
         \x20 that paths with spaces work. It holds `tiny-bert/` (config and tokenizer), `data/`\n\
         \x20 (`train.jsonl`, `test.jsonl`), `trained/` (with `model.safetensors`) and `study.db` (study `s`:\n\
         \x20 maximize, the recipe's space, trials 0–1 COMPLETE, 2 RUNNING; study `empty`: one FAIL trial).\n",
    );
    doc.push_str(&format!(
        "- `@train-data` is `{}`.\n",
        TRAIN_DATA.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" ")
    ));
    doc.push_str(&format!(
        "- `@train` is `{}`.\n",
        TRAIN_BASE.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" ")
    ));
    doc.push_str(&format!(
        "- `@search` is `{}`.\n",
        SEARCH_BASE.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" ")
    ));
    let mut commands: Vec<&str> = Vec::new();
    for c in CASES {
        if !commands.contains(&c.args[0]) {
            commands.push(c.args[0]);
        }
    }
    for command in commands {
        doc.push_str(&format!(
            "\n## {command}\n\n| id | bad input | command line | exit | error |\n|---|---|---|---|---|\n"
        ));
        for c in CASES.iter().filter(|c| c.args[0] == command) {
            let line = std::iter::once("hpo-gpu")
                .chain(c.args.iter().copied())
                .map(shell_word)
                .collect::<Vec<_>>()
                .join(" ");
            let error = if c.stderr.is_empty() { "(works)".to_string() } else { code(c.stderr) };
            doc.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                code(c.id),
                c.input.replace('|', r"\|"),
                code(&line),
                c.exit,
                error
            ));
        }
    }
    doc.push_str(
        "\n## PostgreSQL storages\n\n\
         Run against the test server by `tests/study_postgres.rs` (the table above runs without one).\n\
         `<user>`, `<password>`, `<host>` are the server's, `<db>` a database of the test's own.\n\n\
         | id | bad input | command line | exit | error |\n|---|---|---|---|---|\n",
    );
    for c in common::postgres_errors::POSTGRES_CASES {
        let line = std::iter::once("hpo-gpu")
            .chain(common::postgres_errors::postgres_case_args(c))
            .map(shell_word)
            .collect::<Vec<_>>()
            .join(" ");
        doc.push_str(&format!(
            "| {} | {} | {} | 1 | {} |\n",
            code(c.id),
            c.input,
            code(&line),
            code(c.stderr)
        ));
    }
    doc
}

#[test]
fn docs_match_the_case_table() {
    let path = common::repo().join("docs/cli-errors.md");
    let want = render_docs();
    if std::env::var_os("HPO_GPU_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} differs from the case table; run HPO_GPU_UPDATE_DOCS=1 cargo test --test cli_bad_input",
        path.display()
    );
}
