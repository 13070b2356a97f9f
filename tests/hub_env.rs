//! Hub resolution driven by the environment (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT): a fake
//! HF cache tree, and downloads from a tiny local HTTP server standing in for the Hub.
//!
//! Environment variables are process-wide, so everything that sets them is in the one test function of
//! this test binary; nothing else runs beside it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use hpo_gpu::data::source::{ColumnSpec, load_split};
use hpo_gpu::hub::{RepoKind, list_files, resolve_file, resolve_optional_file};

const HF_VARS: [&str; 8] = [
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "XDG_CACHE_HOME",
];

fn set_env(vars: &[(&str, &str)]) {
    for name in HF_VARS {
        // SAFETY: this test binary runs a single test, so no other thread reads the environment.
        unsafe { std::env::remove_var(name) };
    }
    for (name, value) in vars {
        // SAFETY: as above.
        unsafe { std::env::set_var(name, value) };
    }
}

fn err_of<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(err) => format!("{err:#}"),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} should contain {part:?}");
    }
}

fn imdb_like_parquet(rows: &[(&str, i64)]) -> Result<Vec<u8>> {
    let text: ArrayRef = Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>()));
    let label: ArrayRef = Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("text", text.data_type().clone(), true),
        Field::new("label", label.data_type().clone(), true),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), vec![text, label])?;
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(bytes)
}

/// huggingface_hub's layout: blobs/<etag>, snapshots/<sha>/<file> as a relative symlink, refs/main.
fn cache_file(cache: &Path, folder: &str, file: &str, bytes: &[u8]) -> Result<PathBuf> {
    let repo = cache.join(folder);
    let blob = repo.join("blobs").join(format!("blob-{}", bytes.len()));
    std::fs::create_dir_all(blob.parent().unwrap_or(&repo))?;
    std::fs::write(&blob, bytes)?;
    let link = repo.join("snapshots/0123abcd").join(file);
    std::fs::create_dir_all(link.parent().unwrap_or(&repo))?;
    let depth = file.matches('/').count() + 2;
    let target =
        format!("{}blobs/{}", "../".repeat(depth), blob.file_name().unwrap_or_default().to_string_lossy());
    std::os::unix::fs::symlink(target, &link)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), "0123abcd")?;
    Ok(link)
}

/// A stand-in for the Hub's resolve and api endpoints, answering each connection once and closing it.
fn serve_fake_hub(files: HashMap<String, Vec<u8>>, repos: Vec<String>) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut range_start = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = value.split('-').next().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if let Some(bytes) = files.get(&path)
            {
                let body = bytes[range_start.min(bytes.len())..].to_vec();
                let end = bytes.len().saturating_sub(1);
                let headers = vec![
                    format!("ETag: \"etag-{}\"", bytes.len()),
                    "X-Repo-Commit: 89abcdef".to_string(),
                    format!("Content-Range: bytes {range_start}-{end}/{}", bytes.len()),
                ];
                ("206 Partial Content", headers, body)
            } else if let Some(repo) =
                path.strip_prefix("/api/datasets/").and_then(|p| p.strip_suffix("/revision/main"))
            {
                let listed: Vec<String> = files
                    .keys()
                    .filter_map(|f| {
                        f.strip_prefix(&format!("/datasets/{repo}/resolve/main/")).map(str::to_string)
                    })
                    .map(|f| format!("{{\"rfilename\": \"{f}\"}}"))
                    .collect();
                let body = format!("{{\"sha\": \"89abcdef\", \"siblings\": [{}]}}", listed.join(", "));
                ("200 OK", vec!["Content-Type: application/json".to_string()], body.into_bytes())
            } else if repos.iter().any(|r| path.starts_with(&format!("/{r}/resolve/"))) {
                (
                    "404 Not Found",
                    vec!["X-Error-Code: EntryNotFound".to_string()],
                    b"Entry not found".to_vec(),
                )
            } else {
                let headers = vec![
                    "X-Error-Code: RepoNotFound".to_string(),
                    "X-Error-Message: Repository not found".to_string(),
                ];
                ("401 Unauthorized", headers, b"Repository not found".to_vec())
            };
            let mut response =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
            for header in headers {
                response.push_str(&header);
                response.push_str("\r\n");
            }
            response.push_str("\r\n");
            let mut stream = &stream;
            let _ = stream.write_all(response.as_bytes()).and_then(|()| stream.write_all(&body));
        }
    });
    Ok(address)
}

#[test]
fn hub_resolution_from_the_environment() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let columns = ColumnSpec::default();
    let train = imdb_like_parquet(&[("A fine film.", 1), ("Dreadful.<br /><br />Skip it.", 0), ("Fun.", 1)])?;

    // 1. `--dataset imdb` from an HF cache under $HF_HOME/hub, offline.
    let hf_home = tmp.path().join("hf_home");
    let cached = cache_file(
        &hf_home.join("hub"),
        "datasets--stanfordnlp--imdb",
        "plain_text/train-00000-of-00001.parquet",
        &train,
    )?;
    set_env(&[("HF_HOME", hf_home.to_str().unwrap_or_default()), ("HF_HUB_OFFLINE", "1")]);
    let ds = load_split("imdb", "train", &columns, None)?;
    assert_eq!(
        ds.examples.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
        vec!["A fine film.", "Dreadful.<br /><br />Skip it.", "Fun."]
    );
    assert_eq!(ds.examples.iter().map(|e| e.label).collect::<Vec<_>>(), vec![1, 0, 1]);
    assert_eq!(ds.label_names, vec!["neg".to_string(), "pos".to_string()]);
    assert_eq!(ds.origin, "stanfordnlp/imdb (train)");
    assert_eq!(
        resolve_file(RepoKind::Dataset, "stanfordnlp/imdb", "plain_text/train-00000-of-00001.parquet")?,
        cached
    );
    // `--model prajjwal1/bert-tiny` from the same cache, offline: only pytorch_model.bin is there,
    // so the lookup of model.safetensors must come back empty rather than fail.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_bin");
    let model_dir = "models--prajjwal1--bert-tiny";
    let config = br#"{"model_type": "bert", "vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}"#;
    cache_file(&hf_home.join("hub"), model_dir, "config.json", config)?;
    cache_file(
        &hf_home.join("hub"),
        model_dir,
        "pytorch_model.bin",
        &std::fs::read(fixtures.join("bert_zip.bin"))?,
    )?;
    cache_file(&hf_home.join("hub"), model_dir, "vocab.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nfilm\n")?;
    let files = hpo_gpu::model::files::ModelFiles::resolve("prajjwal1/bert-tiny")?;
    assert!(files.safetensors.is_none() && files.tokenizer_json.is_none());
    assert!(files.pytorch_bin.as_ref().is_some_and(|p| p.ends_with("pytorch_model.bin")));
    assert!(files.vocab_txt.is_some());
    let cfg = hpo_gpu::config::BertConfig::from_file(&files.config)?;
    let (model, report) = hpo_gpu::model::BertModel::from_tensors(&cfg, files.load_tensors()?, "bin", 0)?;
    assert!(report.initialised.is_empty() && model.params.iter().any(|v| *v != 0.0));
    assert_contains(
        &err_of(hpo_gpu::model::files::ModelFiles::resolve("someone/not-cached")),
        &["someone/not-cached", "HF_HUB_OFFLINE=1"],
    );
    // The test split is not cached: offline, that is a clear error naming repo, file and cache.
    let message = err_of(load_split("stanfordnlp/imdb", "test", &columns, None));
    assert_contains(
        &message,
        &[
            "plain_text/test-00000-of-00001.parquet of dataset repo stanfordnlp/imdb",
            "not in the local cache ($HF_HOME/hub = ",
            "HF_HUB_OFFLINE=1 forbids downloading",
        ],
    );
    assert_contains(
        &err_of(load_split("imdb", "unsupervised", &columns, None)),
        &["labelled splits \"train\" and \"test\""],
    );
    // Any other dataset id is listed from the cached snapshot when offline.
    cache_file(
        &hf_home.join("hub"),
        "datasets--someone--reviews",
        "data/train-00000-of-00001.parquet",
        &train,
    )?;
    assert_eq!(
        list_files(RepoKind::Dataset, "someone/reviews")?,
        vec!["data/train-00000-of-00001.parquet".to_string()]
    );
    let ds = load_split("someone/reviews", "train", &columns, None)?;
    assert_eq!((ds.len(), ds.label_names.clone()), (3, vec!["0".to_string(), "1".to_string()]));
    assert_contains(
        &err_of(load_split("someone/absent", "train", &columns, None)),
        &["dataset repo someone/absent", "HF_HUB_OFFLINE=1 forbids listing"],
    );

    // 2. HF_HUB_CACHE wins over HF_HOME, and "true" also means offline.
    let hub_cache = tmp.path().join("hub_cache");
    let weights = cache_file(&hub_cache, "models--org--tiny-bert", "pytorch_model.bin", b"weights")?;
    set_env(&[
        ("HF_HOME", hf_home.to_str().unwrap_or_default()),
        ("HF_HUB_CACHE", hub_cache.to_str().unwrap_or_default()),
        ("HF_HUB_OFFLINE", "true"),
    ]);
    assert_eq!(resolve_optional_file(RepoKind::Model, "org/tiny-bert", "model.safetensors")?, None);
    assert_eq!(
        resolve_optional_file(RepoKind::Model, "org/tiny-bert", "pytorch_model.bin")?,
        Some(weights.clone())
    );
    assert_eq!(std::fs::read(&weights)?, b"weights");
    assert_contains(
        &err_of(load_split("imdb", "train", &columns, None)),
        &["not in the local cache ($HF_HUB_CACHE = "],
    );
    set_env(&[("HUGGINGFACE_HUB_CACHE", hub_cache.to_str().unwrap_or_default()), ("HF_HUB_OFFLINE", "YES")]);
    assert_eq!(resolve_file(RepoKind::Model, "org/tiny-bert", "pytorch_model.bin")?, weights);

    // 3. Online: cache first, then a download from HF_ENDPOINT (a local fake Hub).
    let files = HashMap::from([
        ("/org/tiny-bert/resolve/main/config.json".to_string(), b"{\"hidden_size\": 8}".to_vec()),
        (
            "/datasets/stanfordnlp/imdb/resolve/main/plain_text/test-00000-of-00001.parquet".to_string(),
            train.clone(),
        ),
        ("/datasets/other/set/resolve/main/default/train/0000.parquet".to_string(), train.clone()),
    ]);
    let endpoint =
        serve_fake_hub(files, vec!["org/tiny-bert".to_string(), "datasets/other/set".to_string()])?;
    let download_cache = tmp.path().join("download_cache");
    set_env(&[("HF_HUB_CACHE", download_cache.to_str().unwrap_or_default()), ("HF_ENDPOINT", &endpoint)]);
    let config = resolve_file(RepoKind::Model, "org/tiny-bert", "config.json")?;
    assert_eq!(std::fs::read(&config)?, b"{\"hidden_size\": 8}");
    assert!(
        config.starts_with(download_cache.join("models--org--tiny-bert/snapshots/89abcdef")),
        "{}",
        config.display()
    );
    // The Hub says the repo has no such file: absent, not an error.
    assert_eq!(resolve_optional_file(RepoKind::Model, "org/tiny-bert", "model.safetensors")?, None);
    assert_contains(
        &err_of(resolve_file(RepoKind::Model, "org/tiny-bert", "model.safetensors")),
        &["model repo org/tiny-bert has no file model.safetensors"],
    );
    let message = err_of(resolve_optional_file(RepoKind::Model, "org/missing", "config.json"));
    eprintln!("missing repo: {message}");
    assert_contains(
        &message,
        &[
            "config.json of model repo org/missing",
            "downloading it from http://127.0.0.1:",
            "HTTP 401 RepoNotFound: Repository not found",
            "HF_TOKEN",
        ],
    );
    let ds = load_split("imdb", "test", &columns, None)?;
    assert_eq!((ds.len(), ds.examples[0].text.as_str()), (3, "A fine film."));
    let ds = load_split("other/set", "train", &columns, None)?;
    assert_eq!(ds.len(), 3);
    // Now cached: offline works for the downloaded file.
    set_env(&[("HF_HUB_CACHE", download_cache.to_str().unwrap_or_default()), ("HF_HUB_OFFLINE", "1")]);
    assert_eq!(resolve_file(RepoKind::Model, "org/tiny-bert", "config.json")?, config);

    // 4. No Hub at all (nothing listens): a fast, clear failure.
    let closed = TcpListener::bind("127.0.0.1:0")?;
    let dead_endpoint = format!("http://{}", closed.local_addr()?);
    drop(closed);
    set_env(&[
        ("HF_HUB_CACHE", download_cache.to_str().unwrap_or_default()),
        ("HF_ENDPOINT", &dead_endpoint),
    ]);
    let start = std::time::Instant::now();
    let message = err_of(resolve_file(RepoKind::Model, "org/other", "config.json"));
    eprintln!("no Hub: {message}");
    assert_contains(
        &message,
        &["config.json of model repo org/other", "downloading it from http://127.0.0.1:", "failed"],
    );
    assert!(start.elapsed().as_secs() < 10, "took {:?}", start.elapsed());
    set_env(&[]);
    Ok(())
}
