//! BERT parameters: the named-tensor layout shared by both backends, checkpoint IO and export.

mod pickle;
pub mod safetensors_io;
pub mod tensor;
pub mod torch_bin;
