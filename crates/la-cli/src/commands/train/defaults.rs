//! The default of every `la-cli train` option, in one place: the bottom layer under the
//! flags, the `--config` file and the `--preset`. The training defaults themselves are
//! la-train's (`TrainConfig::default()`, the optimiser and schedule constructors); the ones
//! here are the CLI's own (data set, model shape, loader) and the rules that make some
//! depend on others (`--weights`, `--optimizer`). `--help` shows them from here too.

use la_attention::AttentionInit;
use la_train::{EmaConfig, OptimizerConfig, Schedule, TrainConfig};

use super::options::{AugmentArg, OptimizerArg, Options, ScheduleArg, StopMetricArg};
use crate::data_args::DataKind;
use crate::model_args::{HeadArg, DEFAULT_ARCH, DEFAULT_ATTENTION};
use crate::precision::PrecisionArg;

/// The defaults for a run whose options so far are `given`: fine-tuning (`--weights`) keeps
/// the file's full-width, BatchNorm-free VGG and lowers the pretrained layers' rate, and
/// AdamW has its own weight decay and no momentum.
pub(super) fn defaults(given: &Options) -> Options {
    let pretrained = given.weights.is_some();
    let train = TrainConfig::default();
    let optimizer = given.optimizer.unwrap_or(OptimizerArg::Sgd);
    let (momentum, nesterov, weight_decay) = match optimizer.default_config() {
        OptimizerConfig::Sgd {
            momentum,
            nesterov,
            weight_decay,
        } => (Some(momentum), Some(nesterov), weight_decay),
        OptimizerConfig::AdamW { weight_decay, .. } => (None, None, weight_decay),
    };
    let schedule = match train.schedule {
        Schedule::Constant => ScheduleArg::Constant,
        Schedule::Step { .. } => ScheduleArg::Step,
        Schedule::MultiStep { .. } => ScheduleArg::Multistep,
        Schedule::Cosine { .. } => ScheduleArg::Cosine,
    };
    Options {
        data: Some(DataKind::Digits),
        skip_bad: Some(false),
        val_fraction: Some(0.2),
        arch: Some(DEFAULT_ARCH),
        bn: Some(!pretrained),
        attention: Some(DEFAULT_ATTENTION),
        attention_init: Some(AttentionInit::default()),
        head: Some(HeadArg::Cifar),
        width: Some(if pretrained { 1.0 } else { 0.25 }),
        size: Some(32),
        epochs: Some(train.epochs),
        batch_size: Some(64),
        lr: Some(train.lr),
        optimizer: Some(OptimizerArg::Sgd),
        momentum,
        nesterov,
        weight_decay: Some(weight_decay),
        schedule: Some(schedule),
        step_epochs: Some(Schedule::DEFAULT_STEP_EPOCHS),
        milestones: Some(Schedule::DEFAULT_MILESTONES.to_vec()),
        gamma: Some(Schedule::DEFAULT_GAMMA),
        warmup_epochs: Some(train.warmup_epochs),
        label_smoothing: Some(train.label_smoothing),
        reprob: Some(0.0),
        augment: Some(AugmentArg::Standard),
        ra_num_ops: Some(la_data::auto_augment::RAND_AUGMENT_NUM_OPS),
        ra_magnitude: Some(la_data::auto_augment::RAND_AUGMENT_MAGNITUDE),
        shuffle: Some(true),
        mixup_switch_prob: Some(0.5),
        grad_accum_steps: Some(train.grad_accum_steps),
        pretrained_lr_scale: Some(if pretrained {
            TrainConfig::FINE_TUNE_LR_SCALE
        } else {
            train.pretrained_lr_scale
        }),
        freeze_backbone: Some(train.freeze_backbone),
        early_stop_metric: Some(StopMetricArg::ValTop1),
        model_ema: Some(train.ema.is_some()),
        model_ema_decay: Some(train.ema.map_or(EmaConfig::DEFAULT_DECAY, |e| e.decay)),
        model_ema_warmup: Some(train.ema.is_some_and(|e| e.warmup)),
        device: Some("cpu".into()),
        precision: Some(PrecisionArg::default()),
        seed: Some(train.seed),
        runs_dir: Some("runs".into()),
        tensorboard: Some(train.tensorboard),
        sync_bn: Some(train.sync_bn),
        // No default: each is absent unless given.
        data_dir: None,
        val_dir: None,
        zero_init_attention: None,
        hidden: None,
        weights: None,
        mixup: None,
        cutmix: None,
        mixup_off_epoch: None,
        auto_augment: None,
        max_steps: train.max_steps,
        dump_batches: None,
        train_subset: None,
        attention_blocks: None,
        grad_clip: None,
        early_stop_patience: None,
        layer_decay: None,
        recovery_interval: None,
        checkpoint_hist: None,
        threads: None,
        name: None,
    }
}

/// `value` as a flag value: `0.05`, `vgg16`, `60,120,160`.
fn shown(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(shown).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `[default: ...]` for each option of `train`, with the cases where it differs.
pub fn document_defaults(command: clap::Command) -> clap::Command {
    let as_map = |o: &Options| match serde_json::to_value(o) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let plain = as_map(&defaults(&Options::default()));
    let variants = [
        (
            "with --weights",
            as_map(&defaults(&Options {
                weights: Some("w".into()),
                ..Options::default()
            })),
        ),
        (
            "with --optimizer adamw",
            as_map(&defaults(&Options {
                optimizer: Some(OptimizerArg::Adamw),
                ..Options::default()
            })),
        ),
    ];
    command.mut_args(|arg| {
        let Some(long) = arg.get_long().map(str::to_string) else {
            return arg;
        };
        let value = |map: &serde_json::Map<String, serde_json::Value>| {
            map.get(&long).filter(|v| !v.is_null()).map(shown)
        };
        let Some(default) = value(&plain) else {
            return arg;
        };
        let mut text = format!("[default: {default}");
        for (case, map) in &variants {
            let other = value(map).unwrap_or_else(|| "none".into());
            if other != default {
                text.push_str(&format!("; {other} {case}"));
            }
        }
        text.push(']');
        let help = arg
            .get_help()
            .map(|h| format!("{h} {text}"))
            .unwrap_or(text);
        arg.help(help)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option that the run reads without a fallback has a default, whatever the other
    /// options are.
    #[test]
    fn defaults_cover_every_option_that_needs_one() {
        for weights in [None, Some("w.safetensors".into())] {
            for optimizer in [OptimizerArg::Sgd, OptimizerArg::Adamw] {
                let given = Options {
                    weights: weights.clone(),
                    optimizer: Some(optimizer),
                    ..Options::default()
                };
                let d = defaults(&given);
                let map = match serde_json::to_value(&d).unwrap() {
                    serde_json::Value::Object(m) => m,
                    _ => unreachable!(),
                };
                let unset: Vec<&String> = map
                    .iter()
                    .filter(|(_, v)| v.is_null())
                    .map(|(k, _)| k)
                    .collect();
                let optional = [
                    "data-dir",
                    "val-dir",
                    "zero-init-attention",
                    "hidden",
                    "weights",
                    "mixup",
                    "cutmix",
                    "mixup-off-epoch",
                    "auto-augment",
                    "max-steps",
                    "dump-batches",
                    "train-subset",
                    "attention-blocks",
                    "grad-clip",
                    "early-stop-patience",
                    "layer-decay",
                    "recovery-interval",
                    "checkpoint-hist",
                    "threads",
                    "name",
                ];
                let sgd_only = ["momentum", "nesterov"];
                for key in unset {
                    assert!(
                        optional.contains(&key.as_str())
                            || (optimizer == OptimizerArg::Adamw
                                && sgd_only.contains(&key.as_str())),
                        "option {key} has no default"
                    );
                }
            }
        }
    }

    /// The defaults are the training library's, not a second copy.
    #[test]
    fn training_defaults_come_from_la_train() {
        let d = defaults(&Options::default());
        let t = TrainConfig::default();
        assert_eq!(d.lr, Some(t.lr));
        assert_eq!(d.epochs, Some(t.epochs));
        assert_eq!(d.seed, Some(t.seed));
        assert_eq!(
            OptimizerArg::Sgd.default_config(),
            t.optimizer,
            "the default optimiser"
        );
    }
}
