//! TEMPORARY stub, replaced by the pickle branch.
use super::tensor::RawTensor;
pub fn load_torch_state_dict(path: &std::path::Path) -> anyhow::Result<Vec<(String, RawTensor)>> {
    anyhow::bail!("{}: pytorch_model.bin not supported yet", path.display())
}
