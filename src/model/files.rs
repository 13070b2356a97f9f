//! Finding a model's files: a local directory, or a Hugging Face Hub id resolved through the
//! standard HF cache (and downloaded unless `HF_HUB_OFFLINE=1`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::tensor::RawTensor;

/// The files of one model. Weights are optional so a config-only folder can seed a random init.
#[derive(Clone, Debug, Default)]
pub struct ModelFiles {
    /// What the user named (`--model`), for messages.
    pub origin: String,
    pub config: PathBuf,
    pub safetensors: Option<PathBuf>,
    pub pytorch_bin: Option<PathBuf>,
    pub tokenizer_json: Option<PathBuf>,
    pub vocab_txt: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub special_tokens_map: Option<PathBuf>,
}

const OPTIONAL: [&str; 6] = [
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn looks_like_path(s: &str) -> bool {
    s.starts_with('.')
        || s.starts_with('/')
        || s.starts_with('~')
        || s.matches('/').count() > 1
        || s.contains('\\')
}

impl ModelFiles {
    /// Resolves `--model`: an existing directory, else a Hub id such as `prajjwal1/bert-tiny`.
    pub fn resolve(model: &str) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.exists() {
            bail!("--model {model}: is a file; expected a model directory or a Hugging Face Hub id");
        }
        if looks_like_path(model) {
            bail!("--model {model}: no such directory");
        }
        let get = |f: &str| crate::hub::resolve_optional_file(crate::hub::RepoKind::Model, model, f);
        let Some(config) = get("config.json")? else {
            bail!("--model {model}: the Hub repository has no config.json")
        };
        let mut files = ModelFiles { origin: model.to_string(), config, ..Default::default() };
        files.safetensors = get("model.safetensors")?;
        if files.safetensors.is_none() {
            files.pytorch_bin = get("pytorch_model.bin")?;
        }
        files.tokenizer_json = get("tokenizer.json")?;
        if files.tokenizer_json.is_none() {
            files.vocab_txt = get("vocab.txt")?;
        }
        files.tokenizer_config = get("tokenizer_config.json")?;
        files.special_tokens_map = get("special_tokens_map.json")?;
        Ok(files)
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            bail!("{}: no config.json in the model directory", dir.display());
        }
        let opt = |f: &str| {
            let p = dir.join(f);
            p.is_file().then_some(p)
        };
        let mut files = ModelFiles { origin: dir.display().to_string(), config, ..Default::default() };
        let [st, bin, tj, vocab, tc, stm] = OPTIONAL.map(opt);
        (files.safetensors, files.pytorch_bin, files.tokenizer_json) = (st, bin, tj);
        (files.vocab_txt, files.tokenizer_config, files.special_tokens_map) = (vocab, tc, stm);
        Ok(files)
    }

    /// The weight file to read: model.safetensors if present, else pytorch_model.bin.
    pub fn weights(&self) -> Option<&Path> {
        self.safetensors.as_deref().or(self.pytorch_bin.as_deref())
    }

    /// Reads the checkpoint's tensors.
    pub fn load_tensors(&self) -> Result<Vec<(String, RawTensor)>> {
        if let Some(p) = &self.safetensors {
            return super::safetensors_io::load_safetensors(p);
        }
        if let Some(p) = &self.pytorch_bin {
            return super::torch_bin::load_torch_state_dict(p);
        }
        bail!(
            "{}: no model.safetensors or pytorch_model.bin (use --random-init to start from the config alone)",
            self.origin
        )
    }
}
