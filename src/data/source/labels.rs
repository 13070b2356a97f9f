//! Labels to class ids: raw labels as read from a file become class ids row by row, and [`Sink`]
//! collects the examples of one or more files into a [`Dataset`].

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{Result, bail};

use super::{Dataset, Example, Location, row_error};
use crate::config::MAX_CLASSES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelKind {
    Integer,
    Text,
}

impl fmt::Display for LabelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelKind::Integer => "integer",
            LabelKind::Text => "string",
        })
    }
}

/// One label as read from a file, before it becomes a class id.
#[derive(Debug, Clone, Copy)]
pub(super) enum RawLabel<'a> {
    Int(i128),
    Str(&'a str),
}

/// Turns raw labels into class ids as rows stream in, so that an error can name its row.
pub(super) struct LabelCollector {
    /// Names given by the caller (or found in parquet metadata), with their index.
    given: Option<(Vec<String>, HashMap<String, usize>)>,
    first_kind: Option<(LabelKind, String)>,
    max_int: Option<usize>,
    /// Without given names: distinct string labels in first-seen order (provisional ids).
    seen: HashMap<String, usize>,
    seen_order: Vec<String>,
}

impl LabelCollector {
    fn new(names: Option<&[String]>) -> Result<Self> {
        let mut collector =
            Self { given: None, first_kind: None, max_int: None, seen: HashMap::new(), seen_order: vec![] };
        if let Some(names) = names {
            collector.set_names(names.to_vec())?;
        }
        Ok(collector)
    }

    pub(super) fn set_names(&mut self, names: Vec<String>) -> Result<()> {
        if names.is_empty() {
            bail!("the list of label names is empty");
        }
        if names.len() > MAX_CLASSES {
            bail!("{} label names given; at most {MAX_CLASSES} classes are supported", names.len());
        }
        let mut index = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if index.insert(name.clone(), i).is_some() {
                bail!("label name {name:?} appears twice in the label names {names:?}");
            }
        }
        self.given = Some((names, index));
        Ok(())
    }

    pub(super) fn has_names(&self) -> bool {
        self.given.is_some()
    }

    fn check_kind(&mut self, kind: LabelKind, location: &dyn fmt::Display) -> Result<(), String> {
        match &self.first_kind {
            None => {
                self.first_kind = Some((kind, location.to_string()));
                Ok(())
            }
            Some((first, _)) if *first == kind => Ok(()),
            Some((first, first_at)) => Err(format!(
                "{kind} label, but the label column started with {first} labels ({first_at}); labels must be \
                 all integers or all strings"
            )),
        }
    }

    fn push(&mut self, label: RawLabel<'_>, location: &dyn fmt::Display) -> Result<usize, String> {
        match label {
            RawLabel::Int(value) => self.push_int(value, location),
            RawLabel::Str(value) => self.push_str(value, location),
        }
    }

    fn push_int(&mut self, value: i128, location: &dyn fmt::Display) -> Result<usize, String> {
        self.check_kind(LabelKind::Integer, location)?;
        if value < 0 {
            return Err(format!("negative label {value}: class ids must be 0 or more"));
        }
        let limit = self.given.as_ref().map_or(MAX_CLASSES, |(names, _)| names.len());
        let id = usize::try_from(value).ok().filter(|&id| id < limit).ok_or_else(|| match &self.given {
            Some((names, _)) => {
                format!("label {value} is out of range for the {} label names {names:?}", names.len())
            }
            None => format!("label {value} is too large for a class id (at most {})", MAX_CLASSES - 1),
        })?;
        self.max_int = Some(self.max_int.map_or(id, |max| max.max(id)));
        Ok(id)
    }

    fn push_str(&mut self, value: &str, location: &dyn fmt::Display) -> Result<usize, String> {
        self.check_kind(LabelKind::Text, location)?;
        if let Some((names, index)) = &self.given {
            return index
                .get(value)
                .copied()
                .ok_or_else(|| format!("label {value:?} is not one of the label names {names:?}"));
        }
        if let Some(&id) = self.seen.get(value) {
            return Ok(id);
        }
        if self.seen_order.len() >= MAX_CLASSES {
            return Err(format!(
                "more than {MAX_CLASSES} distinct string labels; is {value:?} really a label?"
            ));
        }
        let id = self.seen_order.len();
        self.seen.insert(value.to_string(), id);
        self.seen_order.push(value.to_string());
        Ok(id)
    }

    /// Final label names, and for unnamed string labels the map from provisional to final ids.
    fn finish(self) -> (Vec<String>, Option<Vec<usize>>) {
        if let Some((names, _)) = self.given {
            return (names, None);
        }
        match self.first_kind {
            Some((LabelKind::Text, _)) => {
                let mut sorted: Vec<(usize, String)> = self.seen_order.into_iter().enumerate().collect();
                sorted.sort_by(|a, b| a.1.cmp(&b.1));
                let mut remap = vec![0; sorted.len()];
                for (final_id, (provisional, _)) in sorted.iter().enumerate() {
                    remap[*provisional] = final_id;
                }
                (sorted.into_iter().map(|(_, name)| name).collect(), Some(remap))
            }
            _ => {
                let count = self.max_int.map_or(0, |max| max + 1);
                ((0..count).map(|id| id.to_string()).collect(), None)
            }
        }
    }
}

/// Collects examples from one or more files (shards) with one label mapping.
pub(super) struct Sink {
    pub(super) labels: LabelCollector,
    pub(super) examples: Vec<Example>,
}

impl Sink {
    pub(super) fn new(label_names: Option<&[String]>) -> Result<Self> {
        Ok(Self { labels: LabelCollector::new(label_names)?, examples: Vec::new() })
    }

    pub(super) fn push(
        &mut self,
        path: &Path,
        location: Location,
        text: String,
        label: RawLabel<'_>,
    ) -> Result<()> {
        if text.trim().is_empty() {
            let what = if text.is_empty() { "empty text" } else { "text is only whitespace" };
            return Err(row_error(path, location, format!("{what}; every example needs some text")));
        }
        let label = self.labels.push(label, &location).map_err(|msg| row_error(path, location, msg))?;
        self.examples.push(Example { text, label });
        Ok(())
    }

    pub(super) fn finish(self, origin: String) -> Result<Dataset> {
        if self.examples.is_empty() {
            bail!("{origin}: the dataset has no examples");
        }
        let (label_names, remap) = self.labels.finish();
        let mut examples = self.examples;
        if let Some(remap) = remap {
            for example in &mut examples {
                example.label = remap[example.label];
            }
        }
        Ok(Dataset { examples, label_names, origin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_labels_sort_without_names() {
        let mut labels = LabelCollector::new(None).unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<usize> = ["pos", "neg", "pos", "mixed"]
            .iter()
            .map(|s| labels.push(RawLabel::Str(s), &"here").unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(ids, vec![0, 1, 0, 2]);
        let (names, remap) = labels.finish();
        assert_eq!(names, vec!["mixed", "neg", "pos"]);
        assert_eq!(remap, Some(vec![2, 1, 0]));
    }
}
