//! `hpo-gpu push` against a local stand-in for the Hugging Face Hub on 127.0.0.1 that checks
//! every request it receives (method, path, Authorization, JSON fields, base64 contents, the
//! sha256 of LFS uploads) and records the sequence. The real Hub is unreachable from our
//! machines, so this is the protocol as huggingface_hub 2.4 speaks it, not a live upload.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hpo_gpu::cli::push::{PushArgs, run_push};
use hpo_gpu::push::{PushOptions, push, push_with};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_TESTtoken0123456789";
const REPO: &str = "alice/minilm-imdb";

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A model folder as `hpo-gpu train --from-study` writes it (weights are random bytes).
fn model_dir(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut state = 0x1234_5678_u64;
    let weights: Vec<u8> = (0..1_500_000)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    files.insert("model.safetensors".to_string(), weights);
    files.insert(
        "config.json".into(),
        serde_json::to_vec_pretty(&json!({
            "architectures": ["BertForSequenceClassification"], "model_type": "bert", "hidden_size": 384,
            "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}
        }))
        .unwrap(),
    );
    files.insert(
        "training_metrics.json".into(),
        serde_json::to_vec_pretty(&json!({
            "epochs": [
                {"epoch": 1, "train_loss": 0.41, "eval_loss": 0.31, "eval_accuracy": 0.8811},
                {"epoch": 2, "train_loss": 0.27, "eval_loss": 0.28, "eval_accuracy": 0.9012},
                {"epoch": 3, "train_loss": 0.19, "eval_loss": 0.29, "eval_accuracy": 0.8990}
            ],
            "best_epoch": 2,
            "objective": 0.9012,
            "train_config": {"learning_rate": 3.15e-5, "batch_size": 32, "weight_decay": 0.1145, "epochs": 3, "seed": 42},
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "dataset": "stanfordnlp/imdb",
            "eval_examples": 25000,
            "study": {"name": "transformers_optuna_study", "best_trial": 27,
                      "params": {"learning_rate": 3.154e-5, "per_device_train_batch_size": 32, "weight_decay": 0.1145}}
        }))
        .unwrap(),
    );
    files.insert("tokenizer_config.json".into(), br#"{"do_lower_case": true}"#.to_vec());
    files.insert("vocab.txt".into(), b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n".to_vec());
    files.insert("notes/empty.txt".into(), Vec::new());
    for (name, bytes) in &files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    // Hidden files (editor swap files, an interrupted export) are not uploaded.
    std::fs::write(root.join(".model.safetensors.swp"), b"junk").unwrap();
    files
}

/// How the stand-in Hub answers.
#[derive(Clone, Debug, Default)]
struct Behaviour {
    /// Status of repo creation (200 when 0).
    create_status: u16,
    /// Answer the LFS batch with the multipart protocol in parts of this size.
    multipart_chunk: Option<usize>,
    /// The LFS object is already stored (no upload actions).
    lfs_present: bool,
    /// Paths the preupload answer marks shouldIgnore.
    ignore: Vec<String>,
    expect_private: bool,
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

struct Outcome {
    sequence: Vec<String>,
    problems: Vec<String>,
    /// README.md as committed.
    readme: Option<String>,
    /// Paths in the commit, with "lfs" or "regular".
    committed: Vec<(String, &'static str)>,
}

fn read_request(stream: &mut TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(Request { method, path, headers, body })
}

fn respond(stream: &mut TcpStream, status: u16, extra: &[(&str, &str)], body: &Value) {
    let text = body.to_string();
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.flush();
}

/// Starts the stand-in Hub; it stops after the commit (or a refused creation), or after 30 s.
fn start_hub(files: BTreeMap<String, Vec<u8>>, b: Behaviour) -> (String, JoinHandle<Outcome>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let base = addr.clone();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let mut out =
            Outcome { sequence: Vec::new(), problems: Vec::new(), readme: None, committed: Vec::new() };
        let model = &files["model.safetensors"];
        let oid = sha_hex(model);
        let mut parts: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let p = |cond: bool, what: String, out: &mut Outcome| {
            if !cond {
                out.problems.push(what);
            }
        };
        while Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let req = match read_request(&mut stream) {
                Ok(r) => r,
                Err(e) => {
                    out.problems.push(format!("unreadable request: {e}"));
                    continue;
                }
            };
            let auth = req.headers.get("authorization").cloned();
            let authed = auth.as_deref() == Some(&format!("Bearer {TOKEN}") as &str);
            let json_body = || serde_json::from_slice::<Value>(&req.body).unwrap_or(Value::Null);
            let label = format!("{} {}", req.method, req.path);
            out.sequence.push(label.clone());
            match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/api/repos/create") => {
                    p(authed, format!("{label}: authorization {auth:?}"), &mut out);
                    let v = json_body();
                    p(
                        v == json!({"name": "minilm-imdb", "organization": "alice", "private": b.expect_private, "type": "model"}),
                        format!("{label}: body {v}"),
                        &mut out,
                    );
                    match b.create_status {
                        0 | 200 => respond(&mut stream, 200, &[], &json!({"url": format!("{base}/{REPO}")})),
                        409 => respond(
                            &mut stream,
                            409,
                            &[],
                            &json!({"error": "You already created this model repo"}),
                        ),
                        code => {
                            respond(
                                &mut stream,
                                code,
                                &[],
                                &json!({"error": "Invalid credentials in Authorization header"}),
                            );
                            break;
                        }
                    }
                }
                ("POST", "/api/models/alice/minilm-imdb/preupload/main") => {
                    p(authed, format!("{label}: authorization {auth:?}"), &mut out);
                    let v = json_body();
                    let listed = v["files"].as_array().cloned().unwrap_or_default();
                    let mut answer = Vec::new();
                    let mut seen = Vec::new();
                    for f in &listed {
                        let path = f["path"].as_str().unwrap_or("").to_string();
                        let size = f["size"].as_u64().unwrap_or(u64::MAX) as usize;
                        let sample = BASE64.decode(f["sample"].as_str().unwrap_or("!")).unwrap_or_default();
                        if let Some(bytes) = files.get(&path) {
                            p(size == bytes.len(), format!("{label}: {path} size {size}"), &mut out);
                            p(
                                sample == bytes[..bytes.len().min(512)],
                                format!("{label}: {path} sample"),
                                &mut out,
                            );
                        } else {
                            p(
                                path == "README.md" && sample.starts_with(b"---\n"),
                                format!("{label}: unexpected {path}"),
                                &mut out,
                            );
                        }
                        let mode = if path.ends_with(".safetensors") { "lfs" } else { "regular" };
                        answer.push(json!({"path": path, "uploadMode": mode, "shouldIgnore": b.ignore.contains(&path)}));
                        seen.push(path);
                    }
                    seen.sort();
                    let mut want: Vec<String> =
                        files.keys().cloned().chain(["README.md".to_string()]).collect();
                    want.sort();
                    p(seen == want, format!("{label}: files {seen:?}"), &mut out);
                    respond(&mut stream, 200, &[], &json!({"files": answer, "commitOid": "0".repeat(40)}));
                }
                ("POST", "/alice/minilm-imdb.git/info/lfs/objects/batch") => {
                    p(authed, format!("{label}: authorization {auth:?}"), &mut out);
                    for h in ["accept", "content-type"] {
                        p(
                            req.headers.get(h).map(String::as_str) == Some("application/vnd.git-lfs+json"),
                            format!("{label}: {h} {:?}", req.headers.get(h)),
                            &mut out,
                        );
                    }
                    let v = json_body();
                    p(
                        v["operation"] == "upload" && v["hash_algo"] == "sha256",
                        format!("{label}: body {v}"),
                        &mut out,
                    );
                    p(v["ref"]["name"] == "main", format!("{label}: ref {}", v["ref"]), &mut out);
                    p(
                        v["objects"] == json!([{"oid": oid, "size": model.len()}]),
                        format!("{label}: objects {}", v["objects"]),
                        &mut out,
                    );
                    let object = if b.lfs_present {
                        json!({"oid": oid, "size": model.len()})
                    } else if let Some(chunk) = b.multipart_chunk {
                        let mut header = json!({"chunk_size": chunk.to_string()});
                        for n in 1..=model.len().div_ceil(chunk) {
                            header[n.to_string()] = json!(format!("{base}/lfs-part/{n}"));
                        }
                        json!({"oid": oid, "size": model.len(), "actions": {
                            "upload": {"href": format!("{base}/lfs-complete/{oid}"), "header": header}}})
                    } else {
                        json!({"oid": oid, "size": model.len(), "actions": {
                            "upload": {"href": format!("{base}/lfs-upload/{oid}")},
                            "verify": {"href": format!("{base}/lfs-verify")}}})
                    };
                    respond(&mut stream, 200, &[], &json!({"transfer": "basic", "objects": [object]}));
                }
                ("PUT", path) if path.starts_with("/lfs-upload/") => {
                    // Storage URLs are pre-signed: the Hub token must not be sent there.
                    p(auth.is_none(), format!("{label}: the token was sent to the storage URL"), &mut out);
                    p(req.body.len() == model.len(), format!("{label}: {} bytes", req.body.len()), &mut out);
                    p(
                        sha_hex(&req.body) == path["/lfs-upload/".len()..],
                        format!("{label}: sha256 mismatch"),
                        &mut out,
                    );
                    respond(&mut stream, 200, &[], &json!({}));
                }
                ("PUT", path) if path.starts_with("/lfs-part/") => {
                    p(auth.is_none(), format!("{label}: the token was sent to the storage URL"), &mut out);
                    let n: usize = path["/lfs-part/".len()..].parse().unwrap_or(0);
                    let etag = format!("\"etag-{n}\"");
                    parts.insert(n, req.body);
                    respond(&mut stream, 200, &[("ETag", &etag)], &json!({}));
                }
                ("POST", path) if path.starts_with("/lfs-complete/") => {
                    p(auth.is_none(), format!("{label}: the token was sent to the completion URL"), &mut out);
                    let v = json_body();
                    let want: Vec<Value> = parts
                        .keys()
                        .map(|n| json!({"partNumber": n, "etag": format!("\"etag-{n}\"")}))
                        .collect();
                    p(v == json!({"oid": oid, "parts": want}), format!("{label}: body {v}"), &mut out);
                    let joined: Vec<u8> = parts.values().flatten().copied().collect();
                    p(
                        sha_hex(&joined) == oid,
                        format!("{label}: the parts do not add up to the file"),
                        &mut out,
                    );
                    respond(&mut stream, 200, &[], &json!({}));
                }
                ("POST", "/lfs-verify") => {
                    p(authed, format!("{label}: authorization {auth:?}"), &mut out);
                    let v = json_body();
                    p(v == json!({"oid": oid, "size": model.len()}), format!("{label}: body {v}"), &mut out);
                    respond(&mut stream, 200, &[], &json!({"message": "ok"}));
                }
                ("POST", "/api/models/alice/minilm-imdb/commit/main") => {
                    p(authed, format!("{label}: authorization {auth:?}"), &mut out);
                    p(
                        req.headers.get("content-type").map(String::as_str) == Some("application/x-ndjson"),
                        format!("{label}: content-type {:?}", req.headers.get("content-type")),
                        &mut out,
                    );
                    let text = String::from_utf8_lossy(&req.body).into_owned();
                    let lines: Vec<Value> =
                        text.lines().map(|l| serde_json::from_str(l).unwrap_or(Value::Null)).collect();
                    p(
                        lines.first()
                            == Some(
                                &json!({"key": "header", "value": {"summary": "Upload model trained with hpo-gpu", "description": ""}}),
                            ),
                        format!("{label}: header {:?}", lines.first()),
                        &mut out,
                    );
                    for line in lines.iter().skip(1) {
                        let v = &line["value"];
                        let path = v["path"].as_str().unwrap_or("").to_string();
                        match line["key"].as_str() {
                            Some("file") => {
                                p(v["encoding"] == "base64", format!("{label}: {path} encoding"), &mut out);
                                let content =
                                    BASE64.decode(v["content"].as_str().unwrap_or("!")).unwrap_or_default();
                                match files.get(&path) {
                                    Some(bytes) => {
                                        p(&content == bytes, format!("{label}: {path} content"), &mut out)
                                    }
                                    None if path == "README.md" => {
                                        out.readme = String::from_utf8(content).ok()
                                    }
                                    None => out.problems.push(format!("{label}: unexpected file {path}")),
                                }
                                out.committed.push((path, "regular"));
                            }
                            Some("lfsFile") => {
                                p(
                                    *v == json!({"path": "model.safetensors", "algo": "sha256", "oid": oid, "size": model.len()}),
                                    format!("{label}: lfsFile {v}"),
                                    &mut out,
                                );
                                out.committed.push((path, "lfs"));
                            }
                            other => out.problems.push(format!("{label}: unknown line key {other:?}")),
                        }
                    }
                    respond(
                        &mut stream,
                        200,
                        &[],
                        &json!({"commitUrl": format!("{base}/{REPO}/commit/abc123"), "commitOid": "abc123", "success": true}),
                    );
                    break;
                }
                _ => {
                    out.problems.push(format!("unexpected request {label}"));
                    respond(&mut stream, 404, &[], &json!({"error": "not found"}));
                }
            }
        }
        out
    });
    (addr, handle)
}

fn assert_clean(out: &Outcome) {
    assert!(out.problems.is_empty(), "the stand-in Hub saw problems:\n{}", out.problems.join("\n"));
}

#[test]
fn push_creates_repo_uploads_lfs_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    let files = model_dir(dir.path());
    let (endpoint, hub) = start_hub(files.clone(), Behaviour::default());
    let report = push(dir.path(), REPO, Some(TOKEN), &endpoint, false, false).unwrap();
    let out = hub.join().unwrap();
    assert_clean(&out);
    assert_eq!(
        out.sequence,
        [
            "POST /api/repos/create",
            "POST /api/models/alice/minilm-imdb/preupload/main",
            "POST /alice/minilm-imdb.git/info/lfs/objects/batch",
            &format!("PUT /lfs-upload/{}", sha_hex(&files["model.safetensors"])),
            "POST /lfs-verify",
            "POST /api/models/alice/minilm-imdb/commit/main",
        ]
    );
    assert_eq!(report.created, Some(true));
    assert_eq!(report.commit_oid.as_deref(), Some("abc123"));
    let mut committed = out.committed.clone();
    committed.sort();
    assert_eq!(
        committed,
        [
            ("README.md".to_string(), "regular"),
            ("config.json".into(), "regular"),
            ("model.safetensors".into(), "lfs"),
            ("notes/empty.txt".into(), "regular"),
            ("tokenizer_config.json".into(), "regular"),
            ("training_metrics.json".into(), "regular"),
            ("vocab.txt".into(), "regular"),
        ]
    );
    // The model card that reached the Hub.
    let card = out.readme.unwrap();
    assert_eq!(card, report.model_card);
    for want in [
        "license: \"apache-2.0\"",
        "base_model: \"sentence-transformers/all-MiniLM-L6-v2\"",
        "datasets:\n- \"stanfordnlp/imdb\"",
        "- hpo-gpu",
        "metrics:\n- accuracy",
        "# minilm-imdb",
        "(labels: neg, pos)",
        "- Study: `transformers_optuna_study` (best trial #27)",
        "| learning_rate | 3.154e-05 |",
        "| per_device_train_batch_size | 32 |",
        "| num_train_epochs | 3 |",
        "- Accuracy: **0.9012** on 25000 evaluation examples",
        "| 2 | 0.2700 | 0.2800 | 0.9012 |",
        "model=\"alice/minilm-imdb\"",
    ] {
        assert!(card.contains(want), "model card lacks {want:?}:\n{card}");
    }
    assert!(!format!("{report:?}").contains(TOKEN));
}

#[test]
fn multipart_lfs_upload_existing_repo_and_ignored_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = model_dir(dir.path());
    let b = Behaviour {
        create_status: 409,
        multipart_chunk: Some(600_000),
        ignore: vec!["notes/empty.txt".into()],
        expect_private: true,
        ..Behaviour::default()
    };
    let (endpoint, hub) = start_hub(files.clone(), b);
    let report = push(dir.path(), REPO, Some(TOKEN), &endpoint, true, false).unwrap();
    let out = hub.join().unwrap();
    assert_clean(&out);
    let oid = sha_hex(&files["model.safetensors"]);
    assert_eq!(
        out.sequence,
        [
            "POST /api/repos/create".to_string(),
            "POST /api/models/alice/minilm-imdb/preupload/main".into(),
            "POST /alice/minilm-imdb.git/info/lfs/objects/batch".into(),
            "PUT /lfs-part/1".into(),
            "PUT /lfs-part/2".into(),
            "PUT /lfs-part/3".into(),
            format!("POST /lfs-complete/{oid}"),
            "POST /api/models/alice/minilm-imdb/commit/main".into(),
        ]
    );
    assert_eq!(report.created, Some(false), "409 means the repository exists");
    assert!(!out.committed.iter().any(|(p, _)| p == "notes/empty.txt"), "ignored files are not committed");
    assert!(report.files.iter().any(|f| f.path == "notes/empty.txt" && f.ignored));
}

#[test]
fn lfs_object_already_on_the_hub_is_not_resent() {
    let dir = tempfile::tempdir().unwrap();
    let files = model_dir(dir.path());
    let (endpoint, hub) = start_hub(files, Behaviour { lfs_present: true, ..Behaviour::default() });
    let report = push(dir.path(), REPO, Some(TOKEN), &endpoint, false, false).unwrap();
    let out = hub.join().unwrap();
    assert_clean(&out);
    assert!(!out.sequence.iter().any(|s| s.starts_with("PUT")), "{:?}", out.sequence);
    assert!(out.committed.contains(&("model.safetensors".into(), "lfs")));
    assert!(report.files.iter().any(|f| f.path == "model.safetensors" && f.already_uploaded));
}

#[test]
fn refused_token_is_a_clear_error_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let files = model_dir(dir.path());
    let (endpoint, hub) = start_hub(files, Behaviour { create_status: 401, ..Behaviour::default() });
    let err = push(dir.path(), REPO, Some(TOKEN), &endpoint, false, false).unwrap_err();
    let out = hub.join().unwrap();
    assert_eq!(out.sequence, ["POST /api/repos/create"]);
    let msg = format!("{err:#}");
    assert!(msg.contains("HTTP 401") && msg.contains("token was refused"), "{msg}");
    assert!(msg.contains("Invalid credentials"), "{msg}");
    assert!(!msg.contains(TOKEN), "the token leaked into the error: {msg}");
}

#[test]
fn dry_run_lists_files_without_network_or_token() {
    let dir = tempfile::tempdir().unwrap();
    model_dir(dir.path());
    // Port 9 (discard) on loopback: nothing listens, so any request would fail the push.
    let args = PushArgs {
        dir: dir.path().to_path_buf(),
        repo_id: REPO.into(),
        private: false,
        dry_run: true,
        endpoint: "http://127.0.0.1:9".into(),
        revision: "main".into(),
        commit_message: "x".into(),
        license: "mit".into(),
    };
    let mut out = Vec::new();
    run_push(&args, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with(
            "dry run: nothing sent. Would upload to http://127.0.0.1:9/alice/minilm-imdb (7 files):"
        ),
        "{text}"
    );
    let line = |name: &str| {
        text.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or_else(|| panic!("{name}:\n{text}"))
    };
    assert!(
        line("model.safetensors").contains("1.4 MiB") && line("model.safetensors").contains("LFS (guessed")
    );
    assert!(line("config.json").contains("regular"));
    assert!(line("README.md").contains("generated model card"));
    assert!(!text.contains(".swp"), "hidden files are skipped");
    assert!(text.contains("--- README.md ---\n---\nlicense: \"mit\""));
}

#[test]
fn bad_folders_and_missing_token_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = format!("{:#}", push(&missing, REPO, None, "http://127.0.0.1:9", false, true).unwrap_err());
    assert!(err.contains("nope") && err.contains("cannot read the model folder"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = format!("{:#}", push(&empty, REPO, None, "http://127.0.0.1:9", false, true).unwrap_err());
    assert!(err.contains("is empty"), "{err}");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = format!("{:#}", push(&file, REPO, None, "http://127.0.0.1:9", false, true).unwrap_err());
    assert!(err.contains("not a directory"), "{err}");

    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("training_metrics.json"), b"{\n  \"objective\": 0.9,\n  oops\n}").unwrap();
    let err = format!("{:#}", push(&model, REPO, None, "http://127.0.0.1:9", false, true).unwrap_err());
    assert!(err.contains("training_metrics.json: line 3: invalid JSON"), "{err}");
    std::fs::write(model.join("training_metrics.json"), [0x7b, 0xff, 0x7d]).unwrap();
    let err = format!("{:#}", push(&model, REPO, None, "http://127.0.0.1:9", false, true).unwrap_err());
    assert!(err.contains("training_metrics.json: not UTF-8"), "{err}");

    std::fs::write(model.join("training_metrics.json"), b"{}").unwrap();
    let err = format!("{:#}", push(&model, REPO, None, "http://127.0.0.1:9", false, false).unwrap_err());
    assert!(err.contains("no Hugging Face token"), "{err}");
    let err = format!(
        "{:#}",
        push(&model, "not-a-repo-id", Some(TOKEN), "http://127.0.0.1:9", false, false).unwrap_err()
    );
    assert!(err.contains("OWNER/NAME"), "{err}");
    let opts = PushOptions { endpoint: "ftp://x".into(), ..PushOptions::new(&model, REPO) };
    let err = format!("{:#}", push_with(&opts, Some(TOKEN)).unwrap_err());
    assert!(err.contains("--endpoint"), "{err}");
    // A folder with only a README of its own: that README is uploaded, no card generated.
    let own = dir.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::write(own.join("README.md"), "my card").unwrap();
    let r = push(&own, REPO, None, "http://127.0.0.1:9", false, true).unwrap();
    assert_eq!(r.model_card, "my card");
    assert_eq!(r.files.len(), 1);
    assert!(!r.files[0].generated);
}

/// Rewrites docs/report/example_model_card.md: the card generated for the fixture folder above.
#[test]
#[ignore = "writes the committed example under docs/report"]
fn regenerate_model_card_example() {
    let dir = tempfile::tempdir().unwrap();
    model_dir(dir.path());
    let report = push(dir.path(), REPO, None, "https://huggingface.co", false, true).unwrap();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/report/example_model_card.md");
    std::fs::write(docs, &report.model_card).unwrap();
    let mut out = Vec::new();
    hpo_gpu::cli::push::print_report(&report, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    println!("{}", text.split("--- README.md ---").next().unwrap());
}
