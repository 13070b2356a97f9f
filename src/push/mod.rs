//! Uploading a model folder to the Hugging Face Hub over its HTTP API, as `huggingface_hub`'s
//! `create_repo` + `upload_folder` do (read from huggingface_hub 2.4: `hf_api.py`,
//! `_commit_api.py`, `lfs.py`):
//!
//! 1. `POST {endpoint}/api/repos/create` `{"name", "organization", "private", "type": "model"}`;
//!    409 (the repo exists) is fine.
//! 2. `POST {endpoint}/api/models/{repo}/preupload/{revision}` with each file's path, size and
//!    first 512 bytes (base64): the Hub answers `uploadMode` `"lfs"` or `"regular"` per file (and
//!    `shouldIgnore` for files its .gitignore excludes, which are skipped).
//! 3. For LFS files, the Git LFS batch API `POST {endpoint}/{repo}.git/info/lfs/objects/batch`
//!    with each object's sha256 and size; then, for objects the Hub does not have yet, a `PUT` of
//!    the bytes to the returned URL (or, when the answer carries `chunk_size`, the multipart
//!    protocol: one `PUT` per part, then a completion `POST` with the parts' ETags), and the
//!    `verify` call when one is returned.
//! 4. `POST {endpoint}/api/models/{repo}/commit/{revision}` with an NDJSON body: a `header` line
//!    (summary, description), a `file` line per regular file (base64 content) and an `lfsFile`
//!    line per LFS file (sha256 oid and size).
//!
//! The token comes from `HF_TOKEN` or the token file huggingface_hub writes (`HF_TOKEN_PATH`,
//! `$HF_HOME/token`, `$XDG_CACHE_HOME/huggingface/token`, `~/.cache/huggingface/token`); it is
//! sent only in `Authorization` headers to the endpoint and is never printed or logged.
//!
//! **Not exercised against the real Hub**: the Hub is unreachable from the machines this was
//! built on. The request sequence is tested against a local HTTP server that checks every request
//! (tests/push_hub_protocol.rs); the real service may differ in details the documentation and
//! huggingface_hub's code do not show.

pub mod card;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files at least this large go through LFS when guessing for `--dry-run` (the Hub's threshold
/// for files its .gitattributes does not already send to LFS).
const LFS_SIZE_THRESHOLD: u64 = 10 * 1024 * 1024;

/// Extensions the Hub's default .gitattributes stores with LFS (used by `--dry-run`).
const LFS_EXTENSIONS: &[&str] = &[
    "7z",
    "arrow",
    "bin",
    "bz2",
    "ckpt",
    "ftz",
    "gz",
    "h5",
    "joblib",
    "lfs",
    "mlmodel",
    "model",
    "msgpack",
    "npy",
    "npz",
    "onnx",
    "ot",
    "parquet",
    "pb",
    "pickle",
    "pkl",
    "pt",
    "pth",
    "rar",
    "safetensors",
    "tar",
    "tflite",
    "tgz",
    "wasm",
    "xz",
    "zip",
    "zst",
];

/// A regular (non-LFS) file is sent base64-encoded inside the commit request; refuse to do that
/// for anything large, whatever the server says.
const MAX_INLINE_BYTES: u64 = 50 * 1024 * 1024;

/// What to upload and where.
#[derive(Clone, Debug)]
pub struct PushOptions {
    pub dir: PathBuf,
    /// `owner/name`.
    pub repo_id: String,
    /// Hub URL without a trailing slash, e.g. `https://huggingface.co`.
    pub endpoint: String,
    pub private: bool,
    /// List what would be sent; no network.
    pub dry_run: bool,
    /// Branch to commit to.
    pub revision: String,
    pub commit_message: String,
    /// License in the generated model card.
    pub license: String,
}

impl PushOptions {
    pub fn new(dir: &Path, repo_id: &str) -> Self {
        PushOptions {
            dir: dir.to_path_buf(),
            repo_id: repo_id.to_string(),
            endpoint: DEFAULT_ENDPOINT.to_string(),
            private: false,
            dry_run: false,
            revision: "main".into(),
            commit_message: "Upload model trained with hpo-gpu".into(),
            license: "apache-2.0".into(),
        }
    }
}

/// One file of the upload.
#[derive(Clone, Debug, PartialEq)]
pub struct PushFile {
    /// Path in the repository (`/`-separated).
    pub path: String,
    pub size: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
    /// Sent through LFS (decided by the Hub; guessed in a dry run).
    pub lfs: bool,
    /// The Hub already had this LFS object, so its bytes were not sent.
    pub already_uploaded: bool,
    /// Excluded by the repository's .gitignore (the Hub said so); not committed.
    pub ignored: bool,
    /// The generated model card (not a file of the folder).
    pub generated: bool,
}

/// What [`push`] did (or, in a dry run, would do).
#[derive(Clone, Debug, PartialEq)]
pub struct PushReport {
    pub repo_id: String,
    pub repo_url: String,
    pub dry_run: bool,
    /// True when the repository was created, false when it existed; None in a dry run.
    pub created: Option<bool>,
    pub files: Vec<PushFile>,
    pub commit_url: Option<String>,
    pub commit_oid: Option<String>,
    /// The README.md that is uploaded (the folder's own, or the generated card).
    pub model_card: String,
}

/// Uploads `dir` to the model repository `repo_id` (creating it if needed) with a generated
/// model card, or with `dry_run` lists what would be sent without any network access. `token`
/// is required unless `dry_run`.
pub fn push(
    dir: &Path,
    repo_id: &str,
    token: Option<&str>,
    endpoint: &str,
    private: bool,
    dry_run: bool,
) -> Result<PushReport> {
    let opts =
        PushOptions { endpoint: endpoint.to_string(), private, dry_run, ..PushOptions::new(dir, repo_id) };
    push_with(&opts, token)
}

/// [`push`] with every option.
pub fn push_with(opts: &PushOptions, token: Option<&str>) -> Result<PushReport> {
    let (namespace, name) = parse_repo_id(&opts.repo_id)?;
    let endpoint = opts.endpoint.trim_end_matches('/');
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        bail!("--endpoint {endpoint:?}: expected an http:// or https:// URL");
    }
    if opts.revision.is_empty() || opts.revision.contains("..") {
        bail!("--revision {:?}: not a branch name", opts.revision);
    }
    let (mut files, sources, card) = collect_files(&opts.dir, &opts.repo_id, &opts.license)?;
    let repo_url = format!("{endpoint}/{}", opts.repo_id);
    if opts.dry_run {
        for f in &mut files {
            f.lfs = guess_lfs(&f.path, f.size);
        }
        return Ok(PushReport {
            repo_id: opts.repo_id.clone(),
            repo_url,
            dry_run: true,
            created: None,
            files,
            commit_url: None,
            commit_oid: None,
            model_card: card,
        });
    }
    let token = match token {
        Some(t) if !t.trim().is_empty() => t.trim(),
        _ => bail!(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` \
             (hpo-gpu reads the token file it writes); --dry-run needs none"
        ),
    };
    let hub = Hub::new(endpoint, token);
    let created = hub.create_repo(namespace, name, opts.private)?;
    let rev = encode_path_segment(&opts.revision);
    hub.preupload(&opts.repo_id, &rev, &mut files, &sources)?;
    let lfs: Vec<usize> = (0..files.len()).filter(|&i| files[i].lfs && !files[i].ignored).collect();
    if !lfs.is_empty() {
        hub.upload_lfs(&opts.repo_id, &opts.revision, &lfs, &mut files, &sources)?;
    }
    let (commit_url, commit_oid) = hub.commit(&opts.repo_id, &rev, &opts.commit_message, &files, &sources)?;
    Ok(PushReport {
        repo_id: opts.repo_id.clone(),
        repo_url,
        dry_run: false,
        created: Some(created),
        files,
        commit_url: Some(commit_url),
        commit_oid: Some(commit_oid),
        model_card: card,
    })
}

/// `owner/name` with the Hub's allowed characters.
pub fn parse_repo_id(repo_id: &str) -> Result<(&str, &str)> {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match repo_id.split_once('/') {
        Some((ns, name)) if ok(ns) && ok(name) => Ok((ns, name)),
        _ => bail!(
            "--repo-id {repo_id:?}: expected OWNER/NAME (letters, digits, '-', '_', '.'; e.g. alice/minilm-imdb)"
        ),
    }
}

/// Where a file's bytes come from.
#[derive(Clone, Debug)]
enum Source {
    Disk(PathBuf),
    Memory(Vec<u8>),
}

impl Source {
    fn open(&self) -> Result<Box<dyn Read + Send>> {
        match self {
            Source::Disk(p) => {
                Ok(Box::new(File::open(p).with_context(|| format!("{}: cannot open", p.display()))?))
            }
            Source::Memory(b) => Ok(Box::new(std::io::Cursor::new(b.clone()))),
        }
    }

    /// The whole content, for regular (small) files.
    fn read_all(&self, size: u64) -> Result<Vec<u8>> {
        if size > MAX_INLINE_BYTES {
            bail!(
                "refusing to send {size} bytes inline in a commit (limit {MAX_INLINE_BYTES}); it should go through LFS"
            );
        }
        let mut buf = Vec::with_capacity(size as usize);
        self.open()?.take(size + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 != size {
            bail!("{}: changed size while uploading", self.describe());
        }
        Ok(buf)
    }

    /// `len` bytes from `offset` (a multipart chunk).
    fn read_range(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        match self {
            Source::Disk(p) => {
                let mut f = File::open(p).with_context(|| format!("{}: cannot open", p.display()))?;
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = Vec::with_capacity(len as usize);
                f.take(len).read_to_end(&mut buf)?;
                if buf.len() as u64 != len {
                    bail!("{}: changed size while uploading", p.display());
                }
                Ok(buf)
            }
            Source::Memory(b) => Ok(b[offset as usize..(offset + len) as usize].to_vec()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Disk(p) => p.display().to_string(),
            Source::Memory(_) => "generated README.md".into(),
        }
    }
}

/// Every regular file under `dir` (hidden entries and symbolic links skipped), with size and
/// sha256, plus the generated README.md unless the folder has one.
fn collect_files(dir: &Path, repo_id: &str, license: &str) -> Result<(Vec<PushFile>, Vec<Source>, String)> {
    let meta =
        std::fs::metadata(dir).with_context(|| format!("{}: cannot read the model folder", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, d)) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}: cannot list", d.display()))? {
            let entry = entry.with_context(|| format!("{}: cannot list", d.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                bail!("{}: a file name is not UTF-8", d.display());
            };
            if name.starts_with('.') {
                continue;
            }
            let rel = if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push((rel, entry.path()));
            } else if kind.is_file() {
                paths.push((rel, entry.path()));
            }
        }
    }
    paths.sort();
    if paths.is_empty() {
        bail!("{}: the model folder is empty", dir.display());
    }
    let mut files = Vec::new();
    let mut sources = Vec::new();
    for (rel, path) in paths {
        let (size, sha256) = hash_file(&path)?;
        files.push(PushFile {
            path: rel,
            size,
            sha256,
            lfs: false,
            already_uploaded: false,
            ignored: false,
            generated: false,
        });
        sources.push(Source::Disk(path));
    }
    let card = match files.iter().position(|f| f.path == "README.md") {
        Some(i) => {
            let bytes = sources[i].read_all(files[i].size)?;
            String::from_utf8(bytes)
                .map_err(|_| anyhow!("{}: README.md is not UTF-8", sources[i].describe()))?
        }
        None => {
            let card = card::model_card(dir, repo_id, license)?;
            let bytes = card.clone().into_bytes();
            files.push(PushFile {
                path: "README.md".into(),
                size: bytes.len() as u64,
                sha256: hex(&Sha256::digest(&bytes)),
                lfs: false,
                already_uploaded: false,
                ignored: false,
                generated: true,
            });
            sources.push(Source::Memory(bytes));
            card
        }
    };
    Ok((files, sources, card))
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn guess_lfs(path: &str, size: u64) -> bool {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    size > 0 && (size >= LFS_SIZE_THRESHOLD || LFS_EXTENSIONS.contains(&ext.as_str()))
}

/// Percent-encodes one URL path segment (a revision like `refs/pr/1` becomes `refs%2Fpr%2F1`,
/// as huggingface_hub's `quote(revision, safe="")`).
fn encode_path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An authenticated client for one endpoint. The token lives only in this struct and in the
/// `Authorization` headers it sets.
struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    auth: String,
}

/// A JSON answer; ureq's `into_string` stops at 10 MB, so a runaway answer cannot exhaust memory.
fn read_json(resp: ureq::Response) -> Result<Value> {
    let text = resp.into_string().map_err(|e| anyhow!("an unreadable body ({e})"))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("invalid JSON ({e})"))
}

/// The body of an error answer, shortened, for messages.
fn error_text(resp: ureq::Response) -> String {
    let text = resp.into_string().unwrap_or_default();
    let text = match serde_json::from_str::<Value>(&text) {
        Ok(v) => v.get("error").and_then(Value::as_str).map(str::to_string).unwrap_or(text),
        Err(_) => text,
    };
    let mut t: String = text.chars().take(300).collect();
    if t.is_empty() {
        t = "(no message)".into();
    }
    t
}

/// Turns a ureq failure into a one-line error naming the step.
fn http_error(step: &str, url: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let hint = match code {
                401 => " (the token was refused: check HF_TOKEN or the token file)",
                403 => " (the token may lack write access to this repository)",
                _ => "",
            };
            anyhow!("{step}: {url} answered HTTP {code}{hint}: {}", error_text(resp))
        }
        ureq::Error::Transport(t) => anyhow!("{step}: cannot reach {url}: {t}"),
    }
}

impl Hub {
    fn new(endpoint: &str, token: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(600))
            .timeout_write(Duration::from_secs(600))
            .user_agent(concat!("hpo-gpu/", env!("CARGO_PKG_VERSION")))
            .build();
        Hub { agent, endpoint: endpoint.to_string(), auth: format!("Bearer {token}") }
    }

    fn post_json(&self, step: &str, url: &str, body: &Value) -> Result<Value> {
        let resp = self
            .agent
            .post(url)
            .set("Authorization", &self.auth)
            .send_json(body)
            .map_err(|e| http_error(step, url, e))?;
        read_json(resp).map_err(|e| anyhow!("{step}: {url} answered {e}"))
    }

    /// Returns true when created, false when it already existed.
    fn create_repo(&self, namespace: &str, name: &str, private: bool) -> Result<bool> {
        let url = format!("{}/api/repos/create", self.endpoint);
        let body = json!({"name": name, "organization": namespace, "private": private, "type": "model"});
        match self.agent.post(&url).set("Authorization", &self.auth).send_json(&body) {
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(409, _)) => Ok(false),
            Err(e) => Err(http_error("creating the repository", &url, e)),
        }
    }

    /// Asks which files go through LFS (and which the repo's .gitignore excludes).
    fn preupload(&self, repo_id: &str, rev: &str, files: &mut [PushFile], sources: &[Source]) -> Result<()> {
        let url = format!("{}/api/models/{repo_id}/preupload/{rev}", self.endpoint);
        for start in (0..files.len()).step_by(256) {
            let end = (start + 256).min(files.len());
            let mut entries = Vec::new();
            for i in start..end {
                let mut sample = Vec::with_capacity(512);
                sources[i].open()?.take(512).read_to_end(&mut sample)?;
                entries.push(
                    json!({"path": files[i].path, "sample": BASE64.encode(&sample), "size": files[i].size}),
                );
            }
            let answer = self.post_json("preupload", &url, &json!({"files": entries}))?;
            let listed = answer
                .get("files")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("preupload: {url} answered without a \"files\" list"))?;
            for f in &mut files[start..end] {
                let info = listed
                    .iter()
                    .find(|x| x.get("path").and_then(Value::as_str) == Some(f.path.as_str()))
                    .ok_or_else(|| anyhow!("preupload: the answer does not mention {}", f.path))?;
                f.lfs = match info.get("uploadMode").and_then(Value::as_str) {
                    Some("lfs") => true,
                    Some("regular") => false,
                    other => bail!("preupload: unknown uploadMode {other:?} for {}", f.path),
                };
                // Empty files cannot go through LFS (huggingface_hub sends them as regular).
                if f.size == 0 {
                    f.lfs = false;
                }
                f.ignored = info.get("shouldIgnore").and_then(Value::as_bool).unwrap_or(false);
            }
        }
        Ok(())
    }

    fn upload_lfs(
        &self,
        repo_id: &str,
        revision: &str,
        which: &[usize],
        files: &mut [PushFile],
        sources: &[Source],
    ) -> Result<()> {
        let url = format!("{}/{repo_id}.git/info/lfs/objects/batch", self.endpoint);
        let objects: Vec<Value> =
            which.iter().map(|&i| json!({"oid": files[i].sha256, "size": files[i].size})).collect();
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects,
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let resp = self
            .agent
            .post(&url)
            .set("Authorization", &self.auth)
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(&body.to_string())
            .map_err(|e| http_error("LFS batch", &url, e))?;
        let answer: Value = read_json(resp).map_err(|e| anyhow!("LFS batch: {url} answered {e}"))?;
        let objects = answer
            .get("objects")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("LFS batch: {url} answered without an \"objects\" list"))?;
        for &i in which {
            let f = &files[i];
            let obj = objects
                .iter()
                .find(|o| o.get("oid").and_then(Value::as_str) == Some(f.sha256.as_str()))
                .ok_or_else(|| {
                    anyhow!("LFS batch: the answer does not mention {} (oid {})", f.path, f.sha256)
                })?;
            if let Some(err) = obj.get("error") {
                bail!("LFS batch: the Hub refused {}: {}", f.path, err);
            }
            let Some(actions) = obj.get("actions") else {
                files[i].already_uploaded = true;
                continue;
            };
            let Some(upload) = actions.get("upload") else {
                files[i].already_uploaded = true;
                continue;
            };
            let href = upload
                .get("href")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("LFS batch: no upload URL for {}", f.path))?;
            let header = upload.get("header").and_then(Value::as_object);
            match header.and_then(|h| h.get("chunk_size")) {
                Some(chunk) => {
                    let chunk = chunk
                        .as_u64()
                        .or_else(|| chunk.as_str().and_then(|s| s.parse().ok()))
                        .filter(|&c| c > 0)
                        .ok_or_else(|| anyhow!("LFS batch: invalid chunk_size {chunk} for {}", f.path))?;
                    self.upload_multipart(
                        f,
                        &sources[i],
                        href,
                        header.unwrap_or(&serde_json::Map::new()),
                        chunk,
                    )?;
                }
                None => {
                    let reader = sources[i].open()?;
                    self.agent
                        .put(href)
                        .set("Content-Length", &f.size.to_string())
                        .send(reader)
                        .map_err(|e| http_error(&format!("uploading {}", f.path), "the LFS upload URL", e))?;
                }
            }
            if let Some(verify) = actions.get("verify").and_then(|v| v.get("href")).and_then(Value::as_str) {
                self.post_json(
                    &format!("verifying {}", f.path),
                    verify,
                    &json!({"oid": f.sha256, "size": f.size}),
                )?;
            }
        }
        Ok(())
    }

    /// The Hub's multipart LFS transfer: part URLs under the keys "1", "2", ... of the header.
    fn upload_multipart(
        &self,
        f: &PushFile,
        source: &Source,
        completion_url: &str,
        header: &serde_json::Map<String, Value>,
        chunk: u64,
    ) -> Result<()> {
        let mut parts: Vec<(u64, &str)> =
            header.iter().filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?))).collect();
        parts.sort();
        if parts.len() as u64 != f.size.div_ceil(chunk) {
            bail!(
                "LFS batch: {} parts offered for {} ({} bytes in chunks of {chunk})",
                parts.len(),
                f.path,
                f.size
            );
        }
        let mut etags = Vec::new();
        for (k, (number, part_url)) in parts.iter().enumerate() {
            let offset = k as u64 * chunk;
            let bytes = source.read_range(offset, chunk.min(f.size - offset))?;
            let resp = self.agent.put(part_url).send_bytes(&bytes).map_err(|e| {
                http_error(&format!("uploading part {number} of {}", f.path), "the LFS part URL", e)
            })?;
            let etag = resp
                .header("ETag")
                .filter(|e| !e.is_empty())
                .ok_or_else(|| anyhow!("uploading part {number} of {}: no ETag in the answer", f.path))?;
            etags.push(json!({"partNumber": number, "etag": etag}));
        }
        self.agent
            .post(completion_url)
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(&json!({"oid": f.sha256, "parts": etags}).to_string())
            .map_err(|e| {
                http_error(&format!("completing the upload of {}", f.path), "the LFS completion URL", e)
            })?;
        Ok(())
    }

    fn commit(
        &self,
        repo_id: &str,
        rev: &str,
        message: &str,
        files: &[PushFile],
        sources: &[Source],
    ) -> Result<(String, String)> {
        let url = format!("{}/api/models/{repo_id}/commit/{rev}", self.endpoint);
        let mut body = String::new();
        body.push_str(
            &json!({"key": "header", "value": {"summary": message, "description": ""}}).to_string(),
        );
        body.push('\n');
        for (f, src) in files.iter().zip(sources).filter(|(f, _)| !f.ignored) {
            let line = if f.lfs {
                json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size}})
            } else {
                let content = src.read_all(f.size).with_context(|| format!("committing {}", f.path))?;
                json!({"key": "file", "value": {"content": BASE64.encode(&content), "path": f.path, "encoding": "base64"}})
            };
            body.push_str(&line.to_string());
            body.push('\n');
        }
        let resp = self
            .agent
            .post(&url)
            .set("Authorization", &self.auth)
            .set("Content-Type", "application/x-ndjson")
            .send_string(&body)
            .map_err(|e| http_error("commit", &url, e))?;
        let answer: Value = read_json(resp).map_err(|e| anyhow!("commit: {url} answered {e}"))?;
        let get = |k: &str| answer.get(k).and_then(Value::as_str).map(str::to_string);
        match (get("commitUrl"), get("commitOid")) {
            (Some(u), Some(o)) => Ok((u, o)),
            _ => bail!("commit: {url} answered without commitUrl/commitOid"),
        }
    }
}

/// The token huggingface_hub would use: `HF_TOKEN`, else the token file. `Ok(None)` when there
/// is none. Never printed.
pub fn find_token() -> Result<Option<String>> {
    token_from(&|k| std::env::var(k).ok(), std::env::home_dir())
}

/// [`find_token`] with the environment and home directory given (testable).
pub fn token_from(env: &dyn Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Result<Option<String>> {
    if let Some(t) = env("HF_TOKEN").map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        return Ok(Some(t));
    }
    let path = if let Some(p) = env("HF_TOKEN_PATH").filter(|p| !p.is_empty()) {
        PathBuf::from(p)
    } else if let Some(h) = env("HF_HOME").filter(|p| !p.is_empty()) {
        PathBuf::from(h).join("token")
    } else if let Some(x) = env("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        PathBuf::from(x).join("huggingface/token")
    } else if let Some(home) = home {
        home.join(".cache/huggingface/token")
    } else {
        return Ok(None);
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow!("{}: the token file is not UTF-8", path.display()))?;
            let t = text.trim();
            Ok((!t.is_empty()).then(|| t.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("{}: cannot read the token file: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn repo_ids_are_validated() {
        assert_eq!(parse_repo_id("alice/minilm-imdb").unwrap(), ("alice", "minilm-imdb"));
        for bad in ["minilm", "a/b/c", "/x", "x/", "a/-b", "a/b..c", "a/b c", "a/b--c"] {
            let err = parse_repo_id(bad).unwrap_err().to_string();
            assert!(err.contains("OWNER/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn revisions_are_quoted_like_huggingface_hub() {
        assert_eq!(encode_path_segment("main"), "main");
        assert_eq!(encode_path_segment("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn lfs_guess_follows_default_gitattributes_and_size() {
        assert!(guess_lfs("model.safetensors", 100));
        assert!(guess_lfs("data/big.txt", 20 << 20));
        assert!(!guess_lfs("config.json", 700));
        assert!(!guess_lfs("model.safetensors", 0));
    }

    #[test]
    fn token_lookup_order() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".cache/huggingface")).unwrap();
        std::fs::write(home.join(".cache/huggingface/token"), "hf_home_token\n").unwrap();
        std::fs::write(dir.path().join("custom"), "  hf_custom  \n").unwrap();
        let lookup = |vars: &[(&str, String)]| {
            let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            token_from(&move |k| map.get(k).cloned(), Some(home.clone())).unwrap()
        };
        assert_eq!(lookup(&[]), Some("hf_home_token".into()));
        assert_eq!(lookup(&[("HF_TOKEN", "hf_env".into())]), Some("hf_env".into()));
        assert_eq!(lookup(&[("HF_TOKEN", " ".into())]), Some("hf_home_token".into()));
        let custom = dir.path().join("custom").display().to_string();
        assert_eq!(lookup(&[("HF_TOKEN_PATH", custom)]), Some("hf_custom".into()));
        assert_eq!(lookup(&[("HF_HOME", dir.path().join("nowhere").display().to_string())]), None);
        std::fs::write(dir.path().join("bad"), [0xff, 0xfe]).unwrap();
        let err = token_from(
            &|k| (k == "HF_TOKEN_PATH").then(|| dir.path().join("bad").display().to_string()),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not UTF-8") && !err.contains('\u{fffd}'), "{err}");
    }
}
