//! Every attention kind against a plain, loop-by-loop reference written here in f64, and
//! its gradients against central finite differences.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use la_attention::{AttentionConfig, AttentionKind, SpatialAttention};

/// Deterministic pseudo-random values in [-1, 1) (a tiny LCG: the tests need no rand crate).
fn values(count: usize, seed: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A module of `kind` on a map of `tokens` positions (Linformer's size), as a network builds it.
fn config(kind: AttentionKind, reduction: usize, tokens: usize) -> AttentionConfig {
    AttentionConfig {
        reduction,
        random_features: 16,
        ..AttentionConfig::new(kind)
    }
    .for_module(3, Some(tokens))
}

/// Performer's random features of a module, as rows.
fn features_of(module: &SpatialAttention) -> Option<Vec<Vec<f64>>> {
    module
        .random_features()
        .map(|f| f.to_dtype(DType::F64).unwrap().to_vec2().unwrap())
}

type Matrix = Vec<Vec<f64>>;

/// Plain matrices of one module, row-major `[out][in]`.
struct Weights {
    wq: Vec<Vec<f64>>,
    bq: Vec<f64>,
    wk: Vec<Vec<f64>>,
    bk: Vec<f64>,
    wv: Vec<Vec<f64>>,
    bv: Vec<f64>,
    wo: Vec<Vec<f64>>,
    bo: Vec<f64>,
    /// Linformer's E and F [k][n].
    tokens: Option<(Matrix, Matrix)>,
}

fn matrix(rows: usize, cols: usize, seed: u64, gain: f64) -> Vec<Vec<f64>> {
    values(rows * cols, seed)
        .chunks(cols)
        .map(|r| r.iter().map(|x| x * gain).collect())
        .collect()
}

impl Weights {
    fn random(c: usize, d: usize, seed: u64) -> Self {
        let g = 1.5 / (c as f64).sqrt();
        Self {
            wq: matrix(d, c, seed, g),
            bq: values(d, seed + 1),
            wk: matrix(d, c, seed + 2, g),
            bk: values(d, seed + 3),
            wv: matrix(c, c, seed + 4, g),
            bv: values(c, seed + 5),
            wo: matrix(c, c, seed + 6, g),
            bo: values(c, seed + 7),
            tokens: None,
        }
    }

    /// The weights a module of `kind` on `c` channels and `n` positions needs.
    fn for_kind(config: &AttentionConfig, c: usize, n: usize, seed: u64) -> Self {
        let mut w = Self::random(c, config.key_channels(c), seed);
        if config.kind == AttentionKind::Linformer {
            let k = config.projected_length(n);
            let g = 1.0 / (n as f64).sqrt();
            w.tokens = Some((matrix(k, n, seed + 8, g), matrix(k, n, seed + 9, g)));
        }
        w
    }

    fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        let dev = Device::Cpu;
        let mat = |m: &Vec<Vec<f64>>| {
            let (r, c) = (m.len(), m[0].len());
            Tensor::from_vec(m.concat(), (r, c), &dev).unwrap()
        };
        let vec = |v: &Vec<f64>| Tensor::new(v.as_slice(), &dev).unwrap();
        let mut map = HashMap::new();
        for (name, w, b) in [
            ("query", &self.wq, &self.bq),
            ("key", &self.wk, &self.bk),
            ("value", &self.wv, &self.bv),
            ("out", &self.wo, &self.bo),
        ] {
            map.insert(format!("{name}.weight"), mat(w));
            map.insert(format!("{name}.bias"), vec(b));
        }
        if let Some((e, f)) = &self.tokens {
            map.insert("key_tokens.weight".into(), mat(e));
            map.insert("value_tokens.weight".into(), mat(f));
        }
        VarBuilder::from_tensors(map, dtype, &dev)
    }
}

fn project(w: &[Vec<f64>], b: &[f64], x: &[f64]) -> Vec<f64> {
    w.iter()
        .zip(b)
        .map(|(row, bi)| row.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + bi)
        .collect()
}

fn softmax(xs: &[f64]) -> Vec<f64> {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// The tokens' projections (q, k, v), one token at a time. `x` is [c][n] for one image.
type Projections = (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<Vec<f64>>);

fn projections(wts: &Weights, x: &[Vec<f64>]) -> Projections {
    let (c, n) = (x.len(), x[0].len());
    let tokens: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..c).map(|ch| x[ch][i]).collect())
        .collect();
    let apply = |w: &[Vec<f64>], b: &[f64]| -> Vec<Vec<f64>> {
        tokens.iter().map(|t| project(w, b, t)).collect()
    };
    (
        apply(&wts.wq, &wts.bq),
        apply(&wts.wk, &wts.bk),
        apply(&wts.wv, &wts.bv),
    )
}

/// How much each query token takes from each value token, [query][key], as the kind defines
/// it (the linear kinds' weights include their epsilon in the normaliser).
fn mixing_weights(
    kind: AttentionKind,
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    wts: &Weights,
    features: Option<&[Vec<f64>]>,
) -> Vec<Vec<f64>> {
    let (n, d) = (q.len(), q[0].len());
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    match kind {
        AttentionKind::Softmax => {
            let scale = (d as f64).powf(-0.5);
            q.iter()
                .map(|qi| softmax(&k.iter().map(|kj| dot(qi, kj) * scale).collect::<Vec<_>>()))
                .collect()
        }
        AttentionKind::Linear | AttentionKind::ReluLinear => {
            let (phi, eps): (fn(f64) -> f64, f64) = if kind == AttentionKind::Linear {
                (|x| if x > 0.0 { x + 1.0 } else { x.exp() }, 1e-6)
            } else {
                (|x| x.max(0.0), 1e-15)
            };
            q.iter()
                .map(|qi| {
                    let pq: Vec<f64> = qi.iter().map(|&x| phi(x)).collect();
                    let sims: Vec<f64> = k
                        .iter()
                        .map(|kj| dot(&pq, &kj.iter().map(|&x| phi(x)).collect::<Vec<_>>()))
                        .collect();
                    let den: f64 = sims.iter().sum::<f64>() + eps;
                    sims.iter().map(|s| s / den).collect()
                })
                .collect()
        }
        AttentionKind::Efficient => {
            // keys: softmax over positions for each channel; queries: softmax over channels.
            let k_cols: Vec<Vec<f64>> = (0..d)
                .map(|dd| softmax(&k.iter().map(|kj| kj[dd]).collect::<Vec<_>>()))
                .collect();
            q.iter()
                .map(|qi| {
                    let sq = softmax(qi);
                    (0..n)
                        .map(|j| (0..d).map(|dd| sq[dd] * k_cols[dd][j]).sum())
                        .collect()
                })
                .collect()
        }
        AttentionKind::Performer => {
            // phi(x) = exp(w x' - |x'|^2 / 2 - max) / sqrt(m), x' = x d^(-1/4); the max is taken
            // per query over the features, and over all keys and features.
            let w = features.expect("performer features");
            let m = w.len();
            let exponents = |x: &[f64]| -> Vec<f64> {
                let x: Vec<f64> = x.iter().map(|v| v * (d as f64).powf(-0.25)).collect();
                let half = x.iter().map(|v| v * v).sum::<f64>() / 2.0;
                w.iter().map(|row| dot(row, &x) - half).collect()
            };
            let eq: Vec<Vec<f64>> = q.iter().map(|x| exponents(x)).collect();
            let ek: Vec<Vec<f64>> = k.iter().map(|x| exponents(x)).collect();
            let key_max = ek
                .iter()
                .flatten()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            let phi_k: Vec<Vec<f64>> = ek
                .iter()
                .map(|e| {
                    e.iter()
                        .map(|v| (v - key_max).exp() / (m as f64).sqrt())
                        .collect()
                })
                .collect();
            eq.iter()
                .map(|e| {
                    let top = e.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let phi_q: Vec<f64> = e
                        .iter()
                        .map(|v| (v - top).exp() / (m as f64).sqrt())
                        .collect();
                    let sims: Vec<f64> = phi_k.iter().map(|pk| dot(&phi_q, pk)).collect();
                    let den = sims.iter().sum::<f64>() + 1e-6;
                    sims.iter().map(|s| s / den).collect()
                })
                .collect()
        }
        AttentionKind::Linformer => {
            // Keys projected by E to k positions; the weights over those go back through F.
            let (e, f) = wts.tokens.as_ref().expect("linformer projections");
            let scale = (d as f64).powf(-0.5);
            let keys: Vec<Vec<f64>> = e
                .iter()
                .map(|row| {
                    (0..d)
                        .map(|dd| (0..n).map(|j| row[j] * k[j][dd]).sum())
                        .collect()
                })
                .collect();
            q.iter()
                .map(|qi| {
                    let a = softmax(
                        &keys
                            .iter()
                            .map(|kk| dot(qi, kk) * scale)
                            .collect::<Vec<_>>(),
                    );
                    (0..n)
                        .map(|j| a.iter().zip(f).map(|(ai, fr)| ai * fr[j]).sum())
                        .collect()
                })
                .collect()
        }
    }
}

/// The module's formula, one token at a time. `x` is [c][n] for one image.
fn reference(
    kind: AttentionKind,
    wts: &Weights,
    features: Option<&[Vec<f64>]>,
    x: &[Vec<f64>],
) -> Vec<Vec<f64>> {
    let (c, n) = (x.len(), x[0].len());
    let (q, k, v) = projections(wts, x);
    let mixed: Vec<Vec<f64>> = mixing_weights(kind, &q, &k, wts, features)
        .iter()
        .map(|weights| {
            (0..c)
                .map(|ch| weights.iter().zip(&v).map(|(w, vj)| w * vj[ch]).sum())
                .collect()
        })
        .collect();
    let out: Vec<_> = mixed.iter().map(|m| project(&wts.wo, &wts.bo, m)).collect();
    (0..c)
        .map(|ch| (0..n).map(|i| x[ch][i] + out[i][ch]).collect())
        .collect()
}

#[test]
fn attention_rows_are_the_weights_each_kind_mixes_with() {
    let (c, h, w) = (16, 5, 7);
    let input = values(c * h * w, 5);
    let image: Vec<Vec<f64>> = (0..c)
        .map(|ch| input[ch * h * w..(ch + 1) * h * w].to_vec())
        .collect();
    for kind in AttentionKind::ALL {
        let config = config(kind, 4, h * w);
        let wts = Weights::for_kind(&config, c, h * w, 9);
        let module = SpatialAttention::new(c, config, wts.var_builder(DType::F64)).unwrap();
        let (q, k, _) = projections(&wts, &image);
        let want = mixing_weights(kind, &q, &k, &wts, features_of(&module).as_deref());
        let x = Tensor::from_vec(input.clone(), (1, c, h, w), &Device::Cpu).unwrap();
        for query in [0, 17, h * w - 1] {
            let row: Vec<f64> = module
                .attention_row(&x, query)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(row.len(), h * w);
            for (j, (got, want)) in row.iter().zip(&want[query]).enumerate() {
                assert!(
                    (got - want).abs() < 1e-12,
                    "{kind} query {query} key {j}: {got} vs {want}"
                );
            }
        }
        assert!(
            module.attention_row(&x, h * w).is_err(),
            "{kind}: query outside the map"
        );
    }
}

#[test]
fn every_kind_matches_the_plain_reference() {
    // A 5x7 map, and a 1x3 map with fewer positions than the keys' 4 channels (where the
    // linear kinds project the tokens rather than fold the projections).
    for (h, w) in [(5, 7), (1, 3)] {
        matches_the_plain_reference_on(h, w);
    }
}

fn matches_the_plain_reference_on(h: usize, w: usize) {
    let (b, c) = (2, 16);
    let input = values(b * c * h * w, 11);
    for kind in AttentionKind::ALL {
        let config = config(kind, 4, h * w);
        let wts = Weights::for_kind(&config, c, h * w, 3);
        for dtype in [DType::F64, DType::F32] {
            let module = SpatialAttention::new(c, config, wts.var_builder(dtype)).unwrap();
            let features = features_of(&module);
            let x = Tensor::from_vec(input.clone(), (b, c, h, w), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y = module.forward(&x).unwrap();
            assert_eq!(y.dims(), &[b, c, h, w]);
            let y: Vec<f64> = y
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-5 };
            for bi in 0..b {
                let img: Vec<Vec<f64>> = (0..c)
                    .map(|ch| input[(bi * c + ch) * h * w..(bi * c + ch + 1) * h * w].to_vec())
                    .collect();
                let want = reference(kind, &wts, features.as_deref(), &img);
                for ch in 0..c {
                    for i in 0..h * w {
                        let got = y[(bi * c + ch) * h * w + i];
                        let diff = (got - want[ch][i]).abs();
                        assert!(
                            diff < tol * (1.0 + want[ch][i].abs()),
                            "{kind} {dtype:?}: image {bi} channel {ch} token {i}: got {got}, want {}",
                            want[ch][i]
                        );
                    }
                }
            }
        }
    }
}

/// Sum of the module output weighted by fixed random values: a scalar whose gradient
/// exercises every output element.
fn loss(module: &SpatialAttention, x: &Tensor, probe: &Tensor) -> Tensor {
    (module.forward(x).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let (b, c, h, w) = (2, 8, 4, 5);
    let dev = Device::Cpu;
    for kind in AttentionKind::ALL {
        let config = config(kind, 2, h * w);
        let wts = Weights::for_kind(&config, c, h * w, 5);
        // Trainable weights: the gradients of the projections are checked too.
        let varmap = candle_nn::VarMap::new();
        let module = {
            let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
            let loaded = wts.var_builder(DType::F64);
            let m = SpatialAttention::new(c, config, vb).unwrap();
            // Copy the fixed weights into the trainable variables.
            for (name, var) in varmap.data().lock().unwrap().iter() {
                let (path, leaf) = name.rsplit_once('.').unwrap();
                let shape = var.as_tensor().shape().clone();
                var.set(&loaded.pp(path).get(shape, leaf).unwrap()).unwrap();
            }
            m
        };
        let x = Var::from_vec(values(b * c * h * w, 21), (b, c, h, w), &dev).unwrap();
        let probe = Tensor::from_vec(values(b * c * h * w, 22), (b, c, h, w), &dev).unwrap();
        let grads = loss(&module, x.as_tensor(), &probe).backward().unwrap();

        let eps = 1e-6;
        let mut checked = 0;
        // Inputs, then every parameter, a handful of elements each.
        let mut targets: Vec<(String, Var)> = vec![("input".into(), x.clone())];
        targets.extend(
            varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone())),
        );
        for (name, var) in targets {
            let analytic = la_testing::values(
                grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{kind}: no gradient for {name}")),
            );
            let base = la_testing::values(var.as_tensor());
            let shape = var.as_tensor().shape().clone();
            let step = (base.len() / 7).max(1);
            for idx in (0..base.len()).step_by(step) {
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, shape.clone(), &dev).unwrap())
                        .unwrap();
                    let l = loss(&module, x.as_tensor(), &probe)
                        .to_scalar::<f64>()
                        .unwrap();
                    var.set(&Tensor::from_vec(base.clone(), shape.clone(), &dev).unwrap())
                        .unwrap();
                    l
                };
                let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
                let diff = (numeric - analytic[idx]).abs();
                assert!(
                    diff < 1e-6 * (1.0 + numeric.abs()),
                    "{kind}: d loss / d {name}[{idx}]: analytic {}, finite differences {numeric}",
                    analytic[idx]
                );
                checked += 1;
            }
        }
        assert!(
            checked > 50,
            "{kind}: only {checked} gradient elements checked"
        );
    }
}

#[test]
fn zero_initialised_output_projection_is_the_identity() {
    let dev = Device::Cpu;
    for kind in AttentionKind::ALL {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let config = AttentionConfig {
            zero_init_out: true,
            ..config(kind, 8, 36)
        };
        let module = SpatialAttention::new(16, config, vb).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 16, 6, 6), &dev).unwrap();
        let y = module.forward(&x).unwrap();
        let diff = la_testing::max_abs_diff(&y, &x);
        assert_eq!(diff, 0.0, "{kind}");
        // The other projections are Kaiming-initialised, not zero.
        let wq = varmap.data().lock().unwrap()["query.weight"]
            .as_tensor()
            .clone();
        let std = la_testing::rms(&wq) as f32;
        assert!((0.1..1.0).contains(&std), "{kind}: query weight std {std}");
    }
}

#[test]
fn kinds_round_trip_through_their_names() {
    for kind in AttentionKind::ALL {
        assert_eq!(kind.name().parse::<AttentionKind>().unwrap(), kind);
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
        assert_eq!(serde_json::from_str::<AttentionKind>(&json).unwrap(), kind);
    }
    let config: AttentionConfig = serde_json::from_str(r#"{"kind": "relu-linear"}"#).unwrap();
    assert_eq!(config, AttentionConfig::new(AttentionKind::ReluLinear));
    let err = "quadratic".parse::<AttentionKind>().unwrap_err();
    assert!(
        err.contains("softmax, linear, efficient, relu-linear"),
        "{err}"
    );
}

#[test]
fn bad_configs_are_errors_not_panics() {
    let dev = Device::Cpu;
    let vb = VarBuilder::zeros(DType::F32, &dev);
    let config = AttentionConfig {
        reduction: 0,
        ..AttentionConfig::new(AttentionKind::Softmax)
    };
    let err = SpatialAttention::new(8, config, vb.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("reduction"), "{err}");
    // Linformer is defined for one map size: it must be given one, and runs only at it.
    let err = SpatialAttention::new(
        8,
        AttentionConfig::new(AttentionKind::Linformer),
        vb.clone(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("defined for one map size"), "{err}");
    let module =
        SpatialAttention::new(8, config_for(AttentionKind::Linformer, 16), vb.clone()).unwrap();
    let err = module
        .forward(&Tensor::zeros((1, 8, 8, 8), DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("built for maps of 16 positions") && err.contains("8x8"),
        "{err}"
    );
    let none = AttentionConfig {
        random_features: 0,
        ..AttentionConfig::new(AttentionKind::Performer)
    };
    let err = SpatialAttention::new(8, none, vb.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one random feature"), "{err}");
    // A map with fewer channels than the reduction still gets one query/key channel.
    let config = AttentionConfig::new(AttentionKind::Softmax);
    assert_eq!(config.key_channels(4), 1);
    assert_eq!(config.key_channels(64), 8);
}

fn config_for(kind: AttentionKind, tokens: usize) -> AttentionConfig {
    AttentionConfig::new(kind).for_module(0, Some(tokens))
}

#[test]
fn performer_features_are_orthogonal_seeded_and_redrawn_only_when_asked() {
    let (m, d) = (10, 4);
    let rows: Vec<Vec<f64>> = la_attention::performer::random_features(m, d, 7)
        .chunks(d)
        .map(<[f64]>::to_vec)
        .collect();
    assert_eq!(rows.len(), m);
    // Rows within a block of d are orthogonal (the last block has m mod d rows).
    for block in rows.chunks(d) {
        for (i, a) in block.iter().enumerate() {
            for b in &block[i + 1..] {
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                assert!(dot.abs() < 1e-10, "{dot}");
            }
        }
    }
    assert_eq!(
        la_attention::performer::random_features(m, d, 7).len(),
        m * d
    );
    assert_eq!(
        la_attention::performer::random_features(m, d, 7),
        la_attention::performer::random_features(m, d, 7)
    );
    assert_ne!(
        la_attention::performer::random_features(m, d, 7),
        la_attention::performer::random_features(m, d, 8)
    );

    // A network's modules get their own seeds; a module keeps its features until redrawn.
    let base = AttentionConfig::new(AttentionKind::Performer);
    assert_ne!(
        base.for_module(0, None).feature_seed,
        base.for_module(1, None).feature_seed
    );
    let vb = VarBuilder::zeros(DType::F64, &Device::Cpu);
    let mut module = SpatialAttention::new(16, base, vb).unwrap();
    let before = features_of(&module).unwrap();
    assert_eq!(
        before,
        features_of(
            &SpatialAttention::new(16, base, VarBuilder::zeros(DType::F64, &Device::Cpu)).unwrap()
        )
        .unwrap()
    );
    module.redraw_features(99).unwrap();
    let after = features_of(&module).unwrap();
    assert_ne!(before, after);
    module.redraw_features(99).unwrap();
    assert_eq!(after, features_of(&module).unwrap());
}

#[test]
fn performer_estimates_softmax_attention_with_many_features() {
    // FAVOR+ is an unbiased estimate of exp(q . k / sqrt(d)); with many features the rows
    // come close to softmax attention's.
    let (c, h, w) = (16, 4, 4);
    let n = h * w;
    let input: Vec<f64> = values(c * n, 31).iter().map(|v| v * 0.5).collect();
    let x = Tensor::from_vec(input, (1, c, h, w), &Device::Cpu).unwrap();
    let wts = Weights::random(c, 4, 13);
    let many = AttentionConfig {
        reduction: 4,
        random_features: 8192,
        ..AttentionConfig::new(AttentionKind::Performer)
    };
    let exact = AttentionConfig {
        reduction: 4,
        ..AttentionConfig::new(AttentionKind::Softmax)
    };
    let softmax_module = SpatialAttention::new(c, exact, wts.var_builder(DType::F64)).unwrap();
    let performer = SpatialAttention::new(c, many, wts.var_builder(DType::F64)).unwrap();
    let mut worst = 0.0f64;
    for query in 0..n {
        let want = softmax_module.attention_row(&x, query).unwrap();
        let got = performer.attention_row(&x, query).unwrap();
        let want: Vec<f64> = want.squeeze(0).unwrap().to_vec1().unwrap();
        let got: Vec<f64> = got.squeeze(0).unwrap().to_vec1().unwrap();
        for (g, e) in got.iter().zip(&want) {
            worst = worst.max((g - e).abs() / e);
        }
    }
    assert!(worst < 0.1, "largest relative error {worst}");
}
