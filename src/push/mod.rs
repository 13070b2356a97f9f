//! Hub upload (placeholder while being written).
