//! BERT parameters: the named-tensor layout shared by both backends, checkpoint IO and export.

pub mod tensor;
