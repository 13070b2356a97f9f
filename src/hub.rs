//! Hugging Face Hub files as local paths: the standard HF cache first (no network), then a download
//! through `hf-hub` unless `HF_HUB_OFFLINE` is set.
//!
//! The cache layout is the one Python's `huggingface_hub` writes
//! (`<cache>/{models,datasets}--org--name/{refs/main, snapshots/<sha>/<file>, .no_exist/<sha>/<file>}`),
//! so files that Python tools already downloaded are reused. `hf-hub` 0.4.3 only knows `HF_HOME`, so the
//! cache directory (`HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`), the offline
//! switch, the endpoint (`HF_ENDPOINT`) and the token (`HF_TOKEN`, `$HF_HOME/token`) are read here.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const REVISION: &str = "main";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn cache_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    fn hf_hub_type(self) -> hf_hub::RepoType {
        match self {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        }
    }
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

/// Where files come from: read once from the environment by [`HubConfig::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The `hub` cache directory (holds `models--*` / `datasets--*`).
    pub cache_dir: PathBuf,
    /// How the cache directory was chosen, for error messages (e.g. `$HF_HOME/hub`).
    pub cache_source: String,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
    pub endpoint: String,
    pub token: Option<String>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn expand_home(path: &str, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => home.join(rest),
        _ if path == "~" && home.is_some() => home.map(Path::to_path_buf).unwrap_or_default(),
        _ => PathBuf::from(path),
    }
}

/// huggingface_hub's truth test for boolean environment variables.
fn env_flag_is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

impl HubConfig {
    /// The configuration Python's `huggingface_hub` would use in this environment.
    pub fn from_env() -> Result<Self> {
        let home = std::env::home_dir();
        let hf_home = match env_nonempty("HF_HOME") {
            Some(dir) => Some((expand_home(&dir, home.as_deref()), "$HF_HOME")),
            None => match env_nonempty("XDG_CACHE_HOME") {
                Some(dir) => Some((
                    expand_home(&dir, home.as_deref()).join("huggingface"),
                    "$XDG_CACHE_HOME/huggingface",
                )),
                None => home.as_ref().map(|h| (h.join(".cache").join("huggingface"), "~/.cache/huggingface")),
            },
        };
        let (cache_dir, cache_source) = if let Some(dir) = env_nonempty("HF_HUB_CACHE") {
            (expand_home(&dir, home.as_deref()), "$HF_HUB_CACHE".to_string())
        } else if let Some(dir) = env_nonempty("HUGGINGFACE_HUB_CACHE") {
            (expand_home(&dir, home.as_deref()), "$HUGGINGFACE_HUB_CACHE".to_string())
        } else if let Some((dir, source)) = &hf_home {
            (dir.join("hub"), format!("{source}/hub"))
        } else {
            bail!(
                "cannot locate the Hugging Face cache: set HF_HOME or HF_HUB_CACHE (no home directory found)"
            );
        };
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            let path = env_nonempty("HF_TOKEN_PATH")
                .map(|p| expand_home(&p, home.as_deref()))
                .or_else(|| hf_home.as_ref().map(|(dir, _)| dir.join("token")))?;
            let token = std::fs::read_to_string(path).ok()?;
            Some(token.trim().to_string()).filter(|t| !t.is_empty())
        });
        Ok(Self {
            cache_dir,
            cache_source,
            offline: env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| env_flag_is_true(&v)),
            endpoint: env_nonempty("HF_ENDPOINT")
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
        })
    }

    fn cache_description(&self) -> String {
        format!("{} = {}", self.cache_source, self.cache_dir.display())
    }
}

/// Refuses ids and file names that could step outside the cache directory.
fn check_names(id: &str, file: &str) -> Result<()> {
    let id_ok = !id.is_empty()
        && id.split('/').count() <= 2
        && id.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
        && !id.contains(['\\', ':'])
        && !id.chars().any(char::is_whitespace);
    if !id_ok {
        bail!("invalid Hugging Face repo id {id:?}: expected \"name\" or \"owner/name\"");
    }
    let file_ok = !file.is_empty()
        && !file.contains('\\')
        && Path::new(file).components().all(|c| matches!(c, Component::Normal(_)));
    if !file_ok {
        bail!("invalid file name {file:?} for repo {id}: expected a relative path inside the repo");
    }
    Ok(())
}

fn repo_dir(config: &HubConfig, kind: RepoKind, id: &str) -> PathBuf {
    config.cache_dir.join(format!("{}--{}", kind.cache_prefix(), id.replace('/', "--")))
}

/// The commit that `refs/main` points at, if the repo is cached.
fn cached_commit(repo_dir: &Path) -> Option<String> {
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(REVISION)).ok()?;
    let commit = commit.trim();
    let valid = !commit.is_empty() && commit.chars().all(|c| c.is_ascii_alphanumeric());
    valid.then(|| commit.to_string())
}

#[derive(Debug, PartialEq, Eq)]
enum CacheLookup {
    Found(PathBuf),
    /// `huggingface_hub` recorded that the repo has no such file (`.no_exist/<sha>/<file>`).
    KnownMissing,
    /// The repo's `main` snapshot is cached but holds no such file.
    SnapshotLacksFile,
    RepoNotCached,
}

fn lookup_cache(config: &HubConfig, kind: RepoKind, id: &str, file: &str) -> CacheLookup {
    let dir = repo_dir(config, kind, id);
    let Some(commit) = cached_commit(&dir) else {
        return CacheLookup::RepoNotCached;
    };
    let path = dir.join("snapshots").join(&commit).join(file);
    // `is_file` follows the blob symlink, so a dangling link counts as missing.
    if path.is_file() {
        CacheLookup::Found(path)
    } else if dir.join(".no_exist").join(&commit).join(file).exists() {
        CacheLookup::KnownMissing
    } else if dir.join("snapshots").join(&commit).is_dir() {
        CacheLookup::SnapshotLacksFile
    } else {
        CacheLookup::RepoNotCached
    }
}

/// What an HTTP error from the Hub means for one file.
enum DownloadFailure {
    /// 404 `EntryNotFound`: the repo exists but has no such file.
    NoSuchFile,
    Other(anyhow::Error),
}

fn hub_api(config: &HubConfig) -> Result<hf_hub::api::sync::Api> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(config.cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.clone())
        .with_progress(progress)
        .build()
        .context("cannot set up the Hugging Face Hub client")
}

fn describe_api_error(err: hf_hub::api::sync::ApiError) -> DownloadFailure {
    use hf_hub::api::sync::ApiError;
    let ApiError::RequestError(request_error) = err else {
        return DownloadFailure::Other(anyhow::Error::new(err));
    };
    match *request_error {
        ureq::Error::Status(status, response) => {
            let code = response.header("x-error-code").unwrap_or("").to_string();
            let message = response.header("x-error-message").unwrap_or("").to_string();
            if status == 404 && (code.is_empty() || code == "EntryNotFound") {
                return DownloadFailure::NoSuchFile;
            }
            let hint = match (status, code.as_str()) {
                (_, "RepoNotFound") | (401, _) => {
                    " (the repo does not exist, or it is private and needs HF_TOKEN)".to_string()
                }
                (_, "GatedRepo") | (403, _) => {
                    " (gated or private repo: accept its terms and set HF_TOKEN)".to_string()
                }
                _ => String::new(),
            };
            let detail = [code, message].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(": ");
            DownloadFailure::Other(anyhow::anyhow!("HTTP {status} {detail}{hint}"))
        }
        transport => DownloadFailure::Other(anyhow::Error::new(transport)),
    }
}

fn download(config: &HubConfig, kind: RepoKind, id: &str, file: &str) -> Result<PathBuf, DownloadFailure> {
    let api = hub_api(config).map_err(DownloadFailure::Other)?;
    let repo = hf_hub::Repo::with_revision(id.to_string(), kind.hf_hub_type(), REVISION.to_string());
    let api_repo = api.repo(repo);
    // hf-hub 0.4.3 unwraps a few server responses; turn such a panic into an error for this file.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| api_repo.download(file)));
    match outcome {
        Ok(Ok(path)) => Ok(path),
        Ok(Err(err)) => Err(describe_api_error(err)),
        Err(_) => {
            Err(DownloadFailure::Other(anyhow::anyhow!("the Hub client failed on an unexpected response")))
        }
    }
}

/// [`resolve_optional_file`] with an explicit configuration.
pub fn resolve_optional_file_with(
    config: &HubConfig,
    kind: RepoKind,
    id: &str,
    file: &str,
) -> Result<Option<PathBuf>> {
    check_names(id, file)?;
    let cached = lookup_cache(config, kind, id, file);
    match cached {
        CacheLookup::Found(path) => return Ok(Some(path)),
        CacheLookup::KnownMissing => return Ok(None),
        // Offline, the cached snapshot is all that can be known about the repo's files.
        CacheLookup::SnapshotLacksFile if config.offline => return Ok(None),
        CacheLookup::RepoNotCached if config.offline => bail!(
            "{file} of {kind} repo {id}: not in the local cache ({}) and HF_HUB_OFFLINE=1 forbids downloading",
            config.cache_description()
        ),
        CacheLookup::SnapshotLacksFile | CacheLookup::RepoNotCached => {}
    }
    match download(config, kind, id, file) {
        Ok(path) => Ok(Some(path)),
        Err(DownloadFailure::NoSuchFile) => Ok(None),
        Err(DownloadFailure::Other(err)) => Err(err.context(format!(
            "{file} of {kind} repo {id}: not in the local cache ({}) and downloading it from {} failed",
            config.cache_description(),
            config.endpoint
        ))),
    }
}

/// [`resolve_file`] with an explicit configuration.
pub fn resolve_file_with(config: &HubConfig, kind: RepoKind, id: &str, file: &str) -> Result<PathBuf> {
    match resolve_optional_file_with(config, kind, id, file)? {
        Some(path) => Ok(path),
        None if config.offline => bail!(
            "{file} of {kind} repo {id}: not in the local cache ({}; the repo's cached snapshot lacks it) and \
             HF_HUB_OFFLINE=1 forbids downloading",
            config.cache_description()
        ),
        None => bail!("{kind} repo {id} has no file {file} (revision {REVISION})"),
    }
}

/// Local path of `file` in repo `id` (revision "main"), from the HF cache or the Hub.
pub fn resolve_file(kind: RepoKind, id: &str, file: &str) -> Result<PathBuf> {
    resolve_file_with(&HubConfig::from_env()?, kind, id, file)
}

/// Same, but Ok(None) when the repo has no such file (so a caller can try model.safetensors, then
/// pytorch_model.bin). Offline, a file missing from the cached `main` snapshot counts as absent; a repo
/// missing from the cache altogether is an error.
pub fn resolve_optional_file(kind: RepoKind, id: &str, file: &str) -> Result<Option<PathBuf>> {
    resolve_optional_file_with(&HubConfig::from_env()?, kind, id, file)
}

/// All files of the cached `main` snapshot, as repo-relative paths with `/` separators, sorted.
fn cached_file_list(config: &HubConfig, kind: RepoKind, id: &str) -> Option<Vec<String>> {
    let dir = repo_dir(config, kind, id);
    let snapshot = dir.join("snapshots").join(cached_commit(&dir)?);
    let mut files = Vec::new();
    let mut pending = vec![(snapshot, String::new())];
    while let Some((dir, prefix)) = pending.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            if path.is_dir() {
                pending.push((path, rel));
            } else if path.is_file() {
                files.push(rel);
            }
        }
    }
    files.sort();
    Some(files)
}

/// [`list_files`] with an explicit configuration.
pub fn list_files_with(config: &HubConfig, kind: RepoKind, id: &str) -> Result<Vec<String>> {
    check_names(id, "placeholder")?;
    if config.offline {
        return cached_file_list(config, kind, id).with_context(|| {
            format!(
                "{kind} repo {id}: not in the local cache ({}) and HF_HUB_OFFLINE=1 forbids listing it on the Hub",
                config.cache_description()
            )
        });
    }
    let api = hub_api(config)?;
    let repo = hf_hub::Repo::with_revision(id.to_string(), kind.hf_hub_type(), REVISION.to_string());
    let info = api.repo(repo).info().map_err(|err| match describe_api_error(err) {
        DownloadFailure::NoSuchFile => anyhow::anyhow!("HTTP 404 (no such repo)"),
        DownloadFailure::Other(err) => err,
    });
    let info =
        info.with_context(|| format!("listing the files of {kind} repo {id} on {} failed", config.endpoint))?;
    let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    files.sort();
    Ok(files)
}

/// Files of repo `id` (revision "main"): from the Hub, or from the cached snapshot when offline.
pub fn list_files(kind: RepoKind, id: &str) -> Result<Vec<String>> {
    list_files_with(&HubConfig::from_env()?, kind, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_config(cache_dir: &Path) -> HubConfig {
        HubConfig {
            cache_dir: cache_dir.to_path_buf(),
            cache_source: "$HF_HUB_CACHE".to_string(),
            offline: true,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
        }
    }

    /// A cache tree like huggingface_hub's: refs/main, snapshots/<sha>/<file>, optional .no_exist.
    fn fake_repo(cache: &Path, folder: &str, files: &[(&str, &str)], ref_text: &str) -> Result<PathBuf> {
        let repo = cache.join(folder);
        std::fs::create_dir_all(repo.join("refs"))?;
        std::fs::write(repo.join("refs/main"), ref_text)?;
        let snapshot = repo.join("snapshots").join(ref_text.trim());
        std::fs::create_dir_all(&snapshot)?;
        for (name, content) in files {
            let path = snapshot.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        Ok(snapshot)
    }

    #[test]
    fn cached_files_resolve_offline() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        // A trailing newline in refs/main (hand-made caches) must not matter.
        let snapshot = fake_repo(
            tmp.path(),
            "models--org--tiny",
            &[("config.json", "{}"), ("sub/w.bin", "w")],
            "abc123\n",
        )?;
        let config = offline_config(tmp.path());
        let path = resolve_file_with(&config, RepoKind::Model, "org/tiny", "config.json")?;
        assert_eq!(path, snapshot.join("config.json"));
        assert_eq!(std::fs::read_to_string(&path)?, "{}");
        assert_eq!(
            resolve_optional_file_with(&config, RepoKind::Model, "org/tiny", "sub/w.bin")?,
            Some(snapshot.join("sub/w.bin"))
        );
        // Same id as a dataset lives in a different folder.
        let err = resolve_file_with(&config, RepoKind::Dataset, "org/tiny", "config.json").unwrap_err();
        assert!(format!("{err:#}").contains("dataset repo org/tiny"), "{err:#}");
        Ok(())
    }

    #[test]
    fn offline_misses_are_clear() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        fake_repo(tmp.path(), "models--org--tiny", &[("pytorch_model.bin", "x")], "abc123")?;
        let config = offline_config(tmp.path());
        // Missing from a cached snapshot: absent, so a caller can fall back to another file.
        assert_eq!(
            resolve_optional_file_with(&config, RepoKind::Model, "org/tiny", "model.safetensors")?,
            None
        );
        let err = resolve_file_with(&config, RepoKind::Model, "org/tiny", "model.safetensors").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("model.safetensors of model repo org/tiny: not in the local cache"), "{msg}");
        assert!(msg.contains("the repo's cached snapshot lacks it"), "{msg}");
        assert!(msg.contains("HF_HUB_OFFLINE=1"), "{msg}");
        // Repo not cached at all: an error even for the optional lookup.
        let err =
            resolve_optional_file_with(&config, RepoKind::Model, "org/other", "config.json").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("config.json of model repo org/other"), "{msg}");
        assert!(msg.contains("not in the local cache ($HF_HUB_CACHE = "), "{msg}");
        assert!(msg.contains("HF_HUB_OFFLINE=1 forbids downloading"), "{msg}");
        Ok(())
    }

    #[test]
    fn no_exist_markers_mean_absent() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        fake_repo(tmp.path(), "models--bert-base-uncased", &[("config.json", "{}")], "c0ffee")?;
        let marker = tmp.path().join("models--bert-base-uncased/.no_exist/c0ffee");
        std::fs::create_dir_all(&marker)?;
        std::fs::write(marker.join("model.safetensors"), "")?;
        let mut config = offline_config(tmp.path());
        config.offline = false; // the marker answers without any network access
        assert_eq!(
            resolve_optional_file_with(&config, RepoKind::Model, "bert-base-uncased", "model.safetensors")?,
            None
        );
        Ok(())
    }

    #[test]
    fn bad_names_are_refused() {
        let config = offline_config(Path::new("/nonexistent"));
        for (id, file) in
            [("../etc", "x"), ("a/b/c", "x"), ("", "x"), ("org/m", "../secret"), ("org/m", "/abs")]
        {
            let err = resolve_optional_file_with(&config, RepoKind::Model, id, file).unwrap_err();
            assert!(format!("{err}").starts_with("invalid"), "{id} {file}: {err}");
        }
    }

    #[test]
    fn cached_snapshot_listing() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        fake_repo(
            tmp.path(),
            "datasets--org--data",
            &[("plain_text/train-00000-of-00001.parquet", "p"), ("README.md", "r")],
            "f00d",
        )?;
        let config = offline_config(tmp.path());
        assert_eq!(
            list_files_with(&config, RepoKind::Dataset, "org/data")?,
            vec!["README.md".to_string(), "plain_text/train-00000-of-00001.parquet".to_string()]
        );
        let err = list_files_with(&config, RepoKind::Dataset, "org/nothing").unwrap_err();
        assert!(format!("{err:#}").contains("HF_HUB_OFFLINE=1 forbids listing"), "{err:#}");
        Ok(())
    }

    #[test]
    fn offline_flag_values() {
        for v in ["1", "true", "TRUE", "yes", "on", " 1 "] {
            assert!(env_flag_is_true(v), "{v}");
        }
        for v in ["0", "false", "no", "", "2"] {
            assert!(!env_flag_is_true(v), "{v}");
        }
    }
}
