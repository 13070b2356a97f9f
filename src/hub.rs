//! TEMPORARY stub, replaced by the hub module from the data branch.
use std::path::PathBuf;
pub enum RepoKind {
    Model,
    Dataset,
}
pub fn resolve_optional_file(_k: RepoKind, id: &str, file: &str) -> anyhow::Result<Option<PathBuf>> {
    anyhow::bail!("{id}/{file}: Hub access not built yet")
}
