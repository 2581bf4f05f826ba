//! A PyTorch VGG state dict -> a weights file of ours, ready to train from.
//!
//! The source is read and checked by `la_vgg::import` (names, shapes, finite values, f16/bf16
//! to f32); then the options reshape the model (attention modules, a new last layer, a CIFAR
//! head, the fc1 collapse for 32x32 inputs) and every tensor the source does not give is
//! initialised by `la_vgg::trainable`'s seeded init (Kaiming for attention, as the model does).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use la_attention::{AttentionConfig, AttentionInit, AttentionKind};
use la_vgg::{HeadConfig, ModelMetadata, Normalize, VggConfig};

/// `--attention`: a kind, or `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionChoice(pub Option<AttentionKind>);

impl FromStr for AttentionChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "none" {
            return Ok(Self(None));
        }
        AttentionKind::from_str(s)
            .map(|k| Self(Some(k)))
            .map_err(|e| format!("{e}, or none"))
    }
}

impl std::fmt::Display for AttentionChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.map_or("none", AttentionKind::name))
    }
}

/// `--head`: keep the source's classifier, or CIFAR's (global pool, one Linear).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadChoice {
    /// The source's classifier (ImageNet: 7x7 pool, 25088-4096-4096-1000).
    Pretrained,
    /// Global average pool and a new Linear to the classes: the 4096-wide layers are dropped.
    Cifar,
}

/// What the converted model looks like; shared by `fetch-weights` and `convert`.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelOptions {
    /// Attention modules after every block: none, softmax, linear, efficient or relu-linear
    /// (new modules are initialised fresh; a source's own softmax modules are kept for softmax).
    #[arg(long, default_value = "softmax", value_name = "KIND")]
    pub attention: AttentionChoice,
    /// How new attention modules start: `identity` (output projection at zero, so the
    /// pretrained network's predictions are unchanged at first) or `kaiming` (the article's
    /// advice; every module then adds a large random residual).
    #[arg(long, default_value_t = AttentionInit::default(), value_name = "INIT")]
    pub attention_init: AttentionInit,
    /// The older spelling (kept for existing scripts): `true` is `--attention-init identity`,
    /// `false` is `kaiming`.
    #[arg(long, hide = true, conflicts_with = "attention_init", num_args = 0..=1, default_missing_value = "true")]
    pub zero_init_attention: Option<bool>,
    /// Replace the last layer (`head.logits`) by a fresh one with N outputs; the hidden
    /// layers (fc1, fc2) are kept.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub classes: Option<u32>,
    /// The classifier: `pretrained` keeps the source's; `cifar` is a global average pool and
    /// a fresh Linear to the classes (use with --classes).
    #[arg(long, value_enum, default_value_t = HeadChoice::Pretrained)]
    pub head: HeadChoice,
    /// For 32x32 inputs (last feature map 1x1): sum fc1's weights over the 7x7 pool positions,
    /// an exact rewrite to a pool-1 head with a [4096, 512] fc1.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub collapse_fc1: bool,
    /// Seed of the freshly initialised tensors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output file [default: weights/<arch>-<attention>-imagenet.safetensors in the workspace].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            attention: AttentionChoice(Some(AttentionKind::Softmax)),
            attention_init: AttentionInit::default(),
            zero_init_attention: None,
            classes: None,
            head: HeadChoice::Pretrained,
            collapse_fc1: false,
            seed: 0,
            out: None,
        }
    }
}

/// A source file read and converted to our names.
#[derive(Debug)]
pub struct Source {
    /// `torchvision`, `timm`, `seed`, or `la-vgg` for a file of ours.
    pub layout: &'static str,
    pub config: VggConfig,
    pub tensors: HashMap<String, Tensor>,
    pub sha256: String,
}

/// Reads a safetensors file in any layout `la_vgg` knows, checking every tensor; errors name
/// the file and the tensor.
pub fn read_source(path: &Path) -> Result<Source> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let sha256 = {
        use sha2::Digest;
        crate::hub::hex(&sha2::Sha256::digest(&bytes))
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        let reason = la_vgg::io::not_safetensors(&bytes, e);
        anyhow::anyhow!("{}: {reason}", path.display())
    })?;
    let ours = header
        .metadata()
        .as_ref()
        .is_some_and(|m| m.contains_key("config"));
    if ours {
        drop(bytes);
        let w = la_vgg::load_weights(path, &Device::Cpu)?;
        return Ok(Source {
            layout: "la-vgg",
            config: w.metadata.config,
            tensors: w.tensors,
            sha256,
        });
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: cannot load its tensors ({e})", path.display()))?;
    drop(bytes);
    let imported = la_vgg::import::import_state_dict(tensors)
        .with_context(|| format!("{}: cannot convert", path.display()))?;
    Ok(Source {
        layout: imported.layout.name(),
        config: imported.config,
        tensors: imported.tensors,
        sha256,
    })
}

/// The converted model: every tensor, and which of them are new.
#[derive(Debug)]
pub struct Prepared {
    pub config: VggConfig,
    pub tensors: HashMap<String, Tensor>,
    /// Names initialised fresh (seeded), sorted.
    pub fresh: Vec<String>,
    /// What was changed from the source, for the user.
    pub notes: Vec<String>,
}

/// Applies `opts` to a converted source and initialises what it lacks.
pub fn prepare(
    source: VggConfig,
    tensors: HashMap<String, Tensor>,
    opts: &ModelOptions,
) -> Result<Prepared> {
    let (mut config, mut tensors) = (source, tensors);
    let mut notes = Vec::new();
    let drop_prefix = |tensors: &mut HashMap<String, Tensor>, prefix: &str| {
        tensors.retain(|name, _| !name.starts_with(prefix));
    };
    if opts.collapse_fc1 {
        if opts.head == HeadChoice::Cifar {
            bail!(
                "--collapse-fc1 rewrites the pretrained head; --head cifar replaces it: choose one"
            );
        }
        (config, tensors) =
            la_vgg::import::collapse_fc1(&config, &tensors).context("--collapse-fc1")?;
        notes.push(format!(
            "fc1 collapsed to a pool-1 head (exact for inputs whose last map is 1x1, e.g. 32x32): head.{} is {:?}",
            if config.head.hidden.is_empty() { "logits" } else { "fc1" },
            config.layers().iter().find(|l| l.name == if config.head.hidden.is_empty() { "head.logits" } else { "head.fc1" })
                .map(|l| l.tensors()[0].1.clone()).unwrap_or_default()
        ));
    }
    if opts.head == HeadChoice::Cifar {
        config.head = HeadConfig::cifar(None);
        drop_prefix(&mut tensors, "head.");
        notes.push("the classifier is replaced by a CIFAR head (global pool, one Linear)".into());
    }
    let wanted = opts.attention.0.map(|kind| AttentionConfig {
        zero_init_out: opts
            .zero_init_attention
            .unwrap_or(opts.attention_init.zero_init_out()),
        ..AttentionConfig::new(kind)
    });
    let (config, tensors, adapted) =
        la_vgg::import::adapt(config, tensors, wanted, opts.classes.map(|n| n as usize))?;
    notes.extend(adapted);
    let mut fresh: Vec<String> = config
        .tensor_shapes()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !tensors.contains_key(name))
        .collect();
    fresh.sort();
    let (_model, varmap) =
        la_vgg::trainable(config.clone(), tensors, opts.seed, DType::F32, &Device::Cpu)?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("the variable map is poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    for name in &fresh {
        let finite = tensors[name]
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            bail!("tensor `{name}` was initialised with non-finite values");
        }
    }
    config.check_tensors(&tensors)?;
    Ok(Prepared {
        config,
        tensors,
        fresh,
        notes,
    })
}

/// The default file name: `<arch>-<attention>-imagenet` (`-pretrained` for a source that is
/// not a 1000-class ImageNet model), then a tag per head change.
pub fn default_file_name(source: &VggConfig, opts: &ModelOptions, result: &VggConfig) -> String {
    let origin = if source.num_classes == 1000 {
        "imagenet"
    } else {
        "pretrained"
    };
    let mut name = format!("{}-{}-{origin}", result.arch_name(), opts.attention);
    if opts.collapse_fc1 {
        name.push_str("-collapsed");
    }
    if opts.head == HeadChoice::Cifar {
        name.push_str("-cifar-head");
    }
    if let Some(n) = opts.classes {
        name.push_str(&format!("-{n}-classes"));
    }
    name + ".safetensors"
}

/// Groups tensor names by module (`blocks.0.attention.query.weight` -> `blocks.0.attention`),
/// for messages.
fn modules(names: &[String]) -> Vec<String> {
    let set: BTreeSet<String> = names
        .iter()
        .map(|n| {
            let parts: Vec<&str> = n.split('.').collect();
            match parts.as_slice() {
                ["blocks", i, "attention", ..] => format!("blocks.{i}.attention"),
                _ => n
                    .rsplit_once('.')
                    .map_or(n.clone(), |(module, _)| module.to_string()),
            }
        })
        .collect();
    set.into_iter().collect()
}

/// What a conversion wrote.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    pub config: VggConfig,
    pub fresh: Vec<String>,
}

/// Converts `source` (described by `source_info`, JSON for the file's `source` metadata) with
/// `opts` and writes the weights file atomically. Prints what it did on stdout.
pub fn convert_and_write(
    source: Source,
    source_info: serde_json::Value,
    opts: &ModelOptions,
) -> Result<Written> {
    let source_config = source.config.clone();
    println!(
        "source: {} layout, {} ({} classes, head {})",
        source.layout,
        source_config.arch_name(),
        source_config.num_classes,
        source_config.head.name()
    );
    let sha256 = source.sha256.clone();
    let prepared = prepare(source.config, source.tensors, opts)?;
    for note in &prepared.notes {
        println!("  {note}");
    }
    let path = match &opts.out {
        Some(p) => p.clone(),
        None => crate::project_root()
            .join("weights")
            .join(default_file_name(&source_config, opts, &prepared.config)),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    // Provenance of the conversion, beside the typed fields.
    let other = HashMap::from([
        ("source_sha256".to_string(), sha256),
        ("seed".to_string(), opts.seed.to_string()),
        (
            "fresh".to_string(),
            serde_json::to_string(&prepared.fresh).unwrap_or_default(),
        ),
    ]);
    let metadata = ModelMetadata {
        normalization: Some(Normalize::IMAGENET),
        source: Some(source_info.to_string()),
        input_size: opts.collapse_fc1.then_some(32),
        other,
        ..ModelMetadata::new(prepared.config.clone())
    };
    la_vgg::save_weights(&path, &metadata, &prepared.tensors)?;
    let fresh = modules(&prepared.fresh);
    if fresh.is_empty() {
        println!("  every tensor comes from the source");
    } else {
        println!(
            "  initialised fresh (seed {}): {}",
            opts.seed,
            fresh.join(", ")
        );
    }
    let attention = match &prepared.config.attention {
        Some(a) => format!("{} attention in {} blocks", a.config.kind, a.blocks.len()),
        None => "no attention".to_string(),
    };
    println!(
        "wrote {}: {}, {attention}, head {}, {} classes",
        path.display(),
        prepared.config.arch_name(),
        prepared.config.head.name(),
        prepared.config.num_classes
    );
    Ok(Written {
        path,
        config: prepared.config,
        fresh: prepared.fresh,
    })
}

/// `cargo xtask convert --from FILE`.
pub fn convert_file(from: &Path, opts: &ModelOptions) -> Result<Written> {
    let source = read_source(from)?;
    let info = serde_json::json!({
        "file": from.display().to_string(),
        "layout": source.layout,
    });
    convert_and_write(source, info, opts)
}
