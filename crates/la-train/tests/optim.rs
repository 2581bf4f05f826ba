//! Optimisers, schedules and losses against plain f64 re-statements of PyTorch's documented
//! update rules and formulas.

use candle_core::{DType, Device, Tensor, Var};
use la_train::loss::{cross_entropy, cross_entropy_soft, label_ranks, log_softmax};
use la_train::optim::{Optimizer, OptimizerConfig, Param};
use la_train::schedule::{LrSchedule, Schedule};

/// Gradients of the quadratic loss 0.5 * sum(a_i w_i^2) - sum(b_i w_i): a_i w_i - b_i.
const A: [f64; 4] = [1.0, 2.0, 0.5, 3.0];
const B: [f64; 4] = [0.3, -1.0, 2.0, 0.1];

fn run_candle(config: OptimizerConfig, decay: bool, steps: usize, lr: f64) -> Vec<f64> {
    let dev = Device::Cpu;
    let w = Var::from_vec(vec![1.0f64, -2.0, 0.5, 4.0], 4, &dev).unwrap();
    let a = Tensor::new(&A, &dev).unwrap();
    let b = Tensor::new(&B, &dev).unwrap();
    let mut opt = Optimizer::new(
        config,
        vec![Param {
            name: "w".into(),
            var: w.clone(),
            lr_scale: 0.5,
            decay,
        }],
    );
    for _ in 0..steps {
        let loss = ((w.as_tensor().sqr().unwrap() * &a)
            .unwrap()
            .sum_all()
            .unwrap()
            * 0.5)
            .unwrap()
            - (w.as_tensor() * &b).unwrap().sum_all().unwrap();
        let grads = loss.unwrap().backward().unwrap();
        opt.step(&grads, lr).unwrap();
    }
    w.as_tensor().to_vec1().unwrap()
}

/// torch.optim.SGD, as documented (dampening 0).
fn sgd_reference(momentum: f64, nesterov: bool, wd: f64, steps: usize, lr: f64) -> Vec<f64> {
    let mut w = vec![1.0f64, -2.0, 0.5, 4.0];
    let mut buf: Option<Vec<f64>> = None;
    for _ in 0..steps {
        let g: Vec<f64> = (0..4).map(|i| A[i] * w[i] - B[i] + wd * w[i]).collect();
        let b: Vec<f64> = match &buf {
            Some(b) => (0..4).map(|i| momentum * b[i] + g[i]).collect(),
            None => g.clone(),
        };
        let d: Vec<f64> = if nesterov {
            (0..4).map(|i| g[i] + momentum * b[i]).collect()
        } else {
            b.clone()
        };
        buf = Some(b);
        for i in 0..4 {
            w[i] -= lr * d[i];
        }
    }
    w
}

/// torch.optim.AdamW, as documented.
fn adamw_reference(b1: f64, b2: f64, eps: f64, wd: f64, steps: usize, lr: f64) -> Vec<f64> {
    let mut w = vec![1.0f64, -2.0, 0.5, 4.0];
    let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
    for t in 1..=steps {
        let g: Vec<f64> = (0..4).map(|i| A[i] * w[i] - B[i]).collect();
        for i in 0..4 {
            w[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let mhat = m[i] / (1.0 - b1.powi(t as i32));
            let vhat = v[i] / (1.0 - b2.powi(t as i32));
            w[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }
    w
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() < 1e-12 * (1.0 + w.abs()),
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn sgd_follows_pytorchs_update_rule() {
    for (momentum, nesterov, wd) in [
        (0.0, false, 0.0),
        (0.9, false, 0.0),
        (0.9, true, 5e-4),
        (0.5, false, 0.1),
    ] {
        let config = OptimizerConfig::Sgd {
            momentum,
            nesterov,
            weight_decay: wd,
        };
        // The parameter's lr_scale of 0.5 halves the rate.
        let got = run_candle(config, true, 7, 0.2);
        let want = sgd_reference(momentum, nesterov, wd, 7, 0.1);
        assert_close(
            &got,
            &want,
            &format!("sgd momentum {momentum} nesterov {nesterov} wd {wd}"),
        );
    }
    // decay = false switches weight decay off for that parameter.
    let config = OptimizerConfig::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.1,
    };
    assert_close(
        &run_candle(config, false, 5, 0.2),
        &sgd_reference(0.9, false, 0.0, 5, 0.1),
        "sgd without decay",
    );
}

#[test]
fn adamw_follows_pytorchs_update_rule() {
    let config = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    assert_close(
        &run_candle(config, true, 10, 0.02),
        &adamw_reference(0.9, 0.999, 1e-8, 0.01, 10, 0.01),
        "adamw",
    );
}

#[test]
fn optimizer_state_round_trips() {
    let dev = Device::Cpu;
    let w = Var::from_vec(vec![1.0f32, 2.0], 2, &dev).unwrap();
    let param = Param {
        name: "w".into(),
        var: w.clone(),
        lr_scale: 1.0,
        decay: true,
    };
    let mut opt = Optimizer::new(OptimizerConfig::sgd(), vec![param.clone()]);
    let grads = w
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.step(&grads, 0.1).unwrap();
    let (state, steps) = opt.state();
    assert!(state.contains_key("momentum.w"));
    let mut other = Optimizer::new(OptimizerConfig::sgd(), vec![param]);
    other.load_state(state.clone(), steps).unwrap();
    assert_eq!(other.steps(), 1);
    let mut bad = state.clone();
    bad.insert(
        "momentum.nope".into(),
        Tensor::zeros(2, DType::F32, &dev).unwrap(),
    );
    let err = other.load_state(bad, 1).unwrap_err().to_string();
    assert!(err.contains("momentum.nope"), "{err}");
}

#[test]
fn schedules_match_their_definitions() {
    let sched = |schedule, warmup| LrSchedule {
        base_lr: 0.1,
        schedule,
        warmup_epochs: warmup,
        epochs: 90,
    };
    let spe = 10; // steps per epoch
    let step = sched(
        Schedule::Step {
            step_epochs: 30,
            gamma: 0.1,
        },
        0.0,
    );
    assert!((step.lr_at(0, spe) - 0.1).abs() < 1e-15);
    assert!((step.lr_at(299, spe) - 0.1).abs() < 1e-15);
    assert!((step.lr_at(300, spe) - 0.01).abs() < 1e-15);
    assert!((step.lr_at(600, spe) - 0.001).abs() < 1e-15);
    let multi = sched(
        Schedule::MultiStep {
            milestones: vec![60, 120, 160],
            gamma: 0.2,
        },
        0.0,
    );
    assert!((multi.lr_at(1200, spe) - 0.1 * 0.2 * 0.2).abs() < 1e-15);
    let cos = sched(Schedule::Cosine { min_lr: 0.0 }, 0.0);
    assert!((cos.lr_at(0, spe) - 0.1).abs() < 1e-15);
    assert!(
        (cos.lr_at(450, spe) - 0.05).abs() < 1e-12,
        "half way: half the rate"
    );
    assert!(cos.lr_at(899, spe) < 1e-5);
    let warm = sched(Schedule::Constant, 2.0);
    assert!((warm.lr_at(0, spe) - 0.1 / 20.0).abs() < 1e-15);
    assert!((warm.lr_at(9, spe) - 0.05).abs() < 1e-15);
    assert!((warm.lr_at(20, spe) - 0.1).abs() < 1e-15);
}

#[test]
fn cross_entropy_matches_its_formula_and_gradient() {
    let dev = Device::Cpu;
    let logits = Var::from_vec(vec![2.0f64, -1.0, 0.5, 0.0, 3.0, -2.0], (2, 3), &dev).unwrap();
    let labels = [0usize, 1];
    let rows = [[2.0f64, -1.0, 0.5], [0.0, 3.0, -2.0]];
    let lsm = |r: &[f64; 3]| {
        let m = r.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        r.map(|x| x - lse)
    };
    for eps in [0.0, 0.1] {
        let want: f64 = rows
            .iter()
            .zip(labels)
            .map(|(r, l)| {
                let lp = lsm(r);
                -(1.0 - eps) * lp[l] - eps * lp.iter().sum::<f64>() / 3.0
            })
            .sum::<f64>()
            / 2.0;
        let loss = cross_entropy(logits.as_tensor(), &labels, eps).unwrap();
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "eps {eps}: {got} vs {want}");
        // d loss / d logits = (softmax - smoothed target) / batch
        let grad = loss
            .backward()
            .unwrap()
            .get(logits.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (i, r) in rows.iter().enumerate() {
            let p = lsm(r).map(f64::exp);
            for j in 0..3 {
                let t = (1.0 - eps) * f64::from(u8::from(j == labels[i])) + eps / 3.0;
                assert!((grad[i][j] - (p[j] - t) / 2.0).abs() < 1e-12);
            }
        }
    }
    // Soft targets equal to one-hot rows give the hard-label loss.
    let onehot = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev).unwrap();
    let soft = cross_entropy_soft(logits.as_tensor(), &onehot, 0.0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let hard = cross_entropy(logits.as_tensor(), &labels, 0.0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((soft - hard).abs() < 1e-15);
    assert!(
        cross_entropy(logits.as_tensor(), &[0, 3], 0.0).is_err(),
        "label out of range"
    );
    let lsm_t = log_softmax(logits.as_tensor())
        .unwrap()
        .exp()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(lsm_t.iter().all(|s| (s - 1.0).abs() < 1e-12));
    assert_eq!(
        label_ranks(logits.as_tensor(), &[0, 2]).unwrap(),
        vec![0, 2]
    );
}

/// timm's layer-wise decay over VGG: conv units (with their BatchNorm) and attention modules
/// are the layers, the head the last; only pretrained tensors get it, times the pretrained
/// scale.
#[test]
fn layer_decay_scales_follow_the_layer_walk() {
    use la_train::optim::{layer_decay_scales, param_groups, GroupRules};
    let config = la_vgg::VggConfig {
        blocks: vec![vec![4, 4], vec![8]],
        batch_norm: true,
        attention: Some(la_vgg::AttentionSites {
            config: la_attention::AttentionConfig::new(la_attention::AttentionKind::Softmax),
            blocks: vec![1],
            input_size: None,
        }),
        head: la_vgg::HeadConfig::cifar(Some(6)),
        num_classes: 3,
        in_channels: 3,
    };
    let scales = layer_decay_scales(&config, 0.5);
    // Layers: convs 0.0, 0.1, 1.0, attention 1, then the head (fc1, logits).
    let want = [
        ("blocks.0.convs.0.weight", 0.5f64.powi(4)),
        ("blocks.0.norms.0.weight", 0.5f64.powi(4)),
        ("blocks.0.convs.1.bias", 0.5f64.powi(3)),
        ("blocks.1.convs.0.weight", 0.25),
        ("blocks.1.attention.query.weight", 0.5),
        ("head.fc1.weight", 1.0),
        ("head.logits.bias", 1.0),
    ];
    for (name, scale) in want {
        assert_eq!(scales[name], scale, "{name}");
    }
    assert_eq!(scales.len(), config.tensor_shapes().len());

    let (_, varmap) = la_vgg::trainable(
        config,
        std::collections::HashMap::new(),
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let rules = GroupRules {
        pretrained: ["blocks.0.convs.0.weight".to_string()].into(),
        pretrained_lr_scale: 0.1,
        pretrained_layer_scale: scales,
        freeze_backbone: false,
        no_decay_bias_norm: true,
    };
    let groups = param_groups(&varmap, &rules);
    let scale_of = |n: &str| groups.iter().find(|p| p.name == n).unwrap().lr_scale;
    assert!((scale_of("blocks.0.convs.0.weight") - 0.1 * 0.0625).abs() < 1e-12);
    // Not pretrained: the full rate, whatever its layer.
    assert_eq!(scale_of("blocks.0.convs.1.weight"), 1.0);
}
