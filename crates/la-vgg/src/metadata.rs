//! What a weights file says besides its tensors, read and written here only.
//!
//! safetensors metadata is a map of strings; each field has one key (`config`,
//! `normalization` and `classes` as JSON, `input_size` and `epoch` as numbers, `source` as
//! text). Unknown keys are kept, so a file written by a later version loses nothing when
//! read and written again.

use std::collections::HashMap;

use la_core::Normalize;

use crate::config::VggConfig;

/// A weights file's description of its model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMetadata {
    pub config: VggConfig,
    /// The input normalisation the weights were trained with; `None` when the file does not
    /// say (a PyTorch state dict: torchvision's and timm's VGGs expect ImageNet's).
    pub normalization: Option<Normalize>,
    /// Class names, one per output.
    pub classes: Option<Vec<String>>,
    /// The input side the model was trained at.
    pub input_size: Option<usize>,
    /// Where the weights come from (`la-train`, `torchvision`, a Hub repository, ...).
    pub source: Option<String>,
    /// Epochs trained.
    pub epoch: Option<usize>,
    /// Other keys, kept as they were.
    pub other: HashMap<String, String>,
}

/// A metadata entry that is not what its key requires; the parse or validation error
/// that says why is its source.
#[derive(Debug, thiserror::Error)]
#[error("metadata `{key}` {reason}")]
pub struct MetadataError {
    pub key: &'static str,
    pub reason: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn malformed(
    key: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> MetadataError {
    move |source| MetadataError {
        key,
        reason: "is malformed".into(),
        source: Some(source),
    }
}

impl ModelMetadata {
    /// A description with only the config.
    pub fn new(config: VggConfig) -> Self {
        Self {
            config,
            normalization: None,
            classes: None,
            input_size: None,
            source: None,
            epoch: None,
            other: HashMap::new(),
        }
    }

    /// The model config a file's metadata holds; `None` for a PyTorch state dict, whose
    /// config is inferred from its tensors.
    pub fn config_in(map: &HashMap<String, String>) -> Result<Option<VggConfig>, MetadataError> {
        let Some(text) = map.get("config") else {
            return Ok(None);
        };
        let config: VggConfig =
            serde_json::from_str(text).map_err(|e| malformed("config")(e.into()))?;
        config
            .validate()
            .map_err(|e| malformed("config")(e.into()))?;
        Ok(Some(config))
    }

    /// The rest of a file's metadata, for the model `config` (the file's, or the one inferred
    /// from its tensors).
    pub fn from_map(
        mut map: HashMap<String, String>,
        config: VggConfig,
    ) -> Result<Self, MetadataError> {
        fn json<T: serde::de::DeserializeOwned>(
            map: &mut HashMap<String, String>,
            key: &'static str,
        ) -> Result<Option<T>, MetadataError> {
            map.remove(key)
                .map(|v| serde_json::from_str(&v).map_err(|e| malformed(key)(e.into())))
                .transpose()
        }
        fn number(
            map: &mut HashMap<String, String>,
            key: &'static str,
        ) -> Result<Option<usize>, MetadataError> {
            map.remove(key)
                .map(|v| v.trim().parse().map_err(|e| malformed(key)(Box::new(e))))
                .transpose()
        }
        map.remove("config");
        let normalization: Option<Normalize> = json(&mut map, "normalization")?;
        if let Some(n) = &normalization {
            n.validate()
                .map_err(|e| malformed("normalization")(e.into()))?;
        }
        let classes: Option<Vec<String>> = json(&mut map, "classes")?;
        if let Some(names) = &classes {
            if names.len() != config.num_classes {
                return Err(MetadataError {
                    key: "classes",
                    reason: format!(
                        "has {} names for {} outputs",
                        names.len(),
                        config.num_classes
                    ),
                    source: None,
                });
            }
        }
        Ok(Self {
            config,
            normalization,
            classes,
            input_size: number(&mut map, "input_size")?,
            source: map.remove("source"),
            epoch: number(&mut map, "epoch")?,
            other: map,
        })
    }

    /// The metadata map to store.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = self.other.clone();
        map.insert("config".into(), json(&self.config));
        if let Some(n) = &self.normalization {
            map.insert("normalization".into(), json(n));
        }
        if let Some(c) = &self.classes {
            map.insert("classes".into(), json(c));
        }
        if let Some(s) = self.input_size {
            map.insert("input_size".into(), s.to_string());
        }
        if let Some(s) = &self.source {
            map.insert("source".into(), s.clone());
        }
        if let Some(e) = self.epoch {
            map.insert("epoch".into(), e.to_string());
        }
        map
    }

    /// Class names: the file's, else the output indices.
    pub fn class_names(&self) -> Vec<String> {
        self.classes.clone().unwrap_or_else(|| {
            (0..self.config.num_classes)
                .map(|i| i.to_string())
                .collect()
        })
    }
}

/// JSON of the plain data types above (configs, normalisations, names), which always
/// serialise.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}
