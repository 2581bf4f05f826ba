//! Each op's generic form, on a chosen device, against its fast CPU form: values and
//! gradients at small odd sizes. The tests run these on the CPU (where the generic form is
//! forced with [`crate::with_form`]), and `la-cli selftest --device cuda` runs the same list
//! on a GPU, there also with the GPU's own kernels (cuDNN's conv, the CUDA pools and biases),
//! so every form a build can run is checked against the same reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::BatchNorm;

use crate::form::{with_form, Form};
use crate::linear::FeatureMap;

/// The outcome of one comparison: the largest error of the values and of the gradients,
/// each relative to the reference's largest magnitude (at least 1).
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    pub value_error: f64,
    pub grad_error: f64,
    pub tolerance: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.value_error <= self.tolerance && self.grad_error <= self.tolerance
    }
}

/// The tolerance of a comparison in `dtype`: 1e-10 in f64, 1e-4 in f32.
pub fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-10
    } else {
        1e-4
    }
}

/// The error of `ours` against `reference`: max |a - b| / max(1, max |b|).
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    if ours.dims() != reference.dims() {
        candle_core::bail!(
            "shapes differ: {:?} against {:?}",
            ours.dims(),
            reference.dims()
        )
    }
    if reference.elem_count() == 0 {
        return Ok(0.0);
    }
    let to64 = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let (a, b) = (to64(ours)?, to64(reference)?);
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
    // A NaN difference is a failure, not a pass.
    Ok(if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / scale
    })
}

/// Deterministic values in [lo, hi) from a seed (SplitMix64), identical on every machine.
pub fn uniform(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let count: usize = shape.iter().product();
    let values: Vec<f64> = (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>>;

/// One op at one size: its inputs (on the CPU, f64), the op (returning one or more outputs;
/// the loss is taken on the first) and whether it has a backward pass.
pub struct Case {
    pub name: String,
    inputs: Vec<Tensor>,
    op: Op,
    differentiable: bool,
}

impl Case {
    fn new(
        name: impl Into<String>,
        inputs: Vec<Tensor>,
        op: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            inputs,
            op: Box::new(op),
            differentiable: true,
        }
    }

    fn without_backward(mut self) -> Self {
        self.differentiable = false;
        self
    }

    /// Runs the op in `form` on `device`: its outputs and the gradient of
    /// sum(first output x probe) with respect to every input.
    fn run(&self, form: Form, device: &Device, dtype: DType) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        with_form(form, || {
            let vars = self
                .inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?))
                .collect::<Result<Vec<_>>>()?;
            let tensors: Vec<Tensor> = if self.differentiable {
                vars.iter().map(|v| v.as_tensor().clone()).collect()
            } else {
                vars.iter().map(|v| v.as_tensor().detach()).collect()
            };
            let outputs = (self.op)(&tensors)?;
            if !self.differentiable {
                return Ok((outputs, vec![]));
            }
            let first = &outputs[0];
            let probe = uniform(first.dims(), -1.0, 1.0, 99)?
                .to_dtype(dtype)?
                .to_device(device)?;
            let grads = (first * probe)?.sum_all()?.backward()?;
            let grads = vars
                .iter()
                .map(|v| match grads.get(v.as_tensor()) {
                    Some(g) => Ok(g.clone()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((outputs, grads))
        })
    }

    /// The generic form on `device` against the fast form on the CPU, in `dtype`.
    pub fn compare(&self, device: &Device, dtype: DType) -> Result<Comparison> {
        self.compare_form(Form::Generic, device, dtype)
    }

    /// `form` on `device` against the fast form on the CPU, in `dtype`: the generic form, or
    /// on a GPU its own kernels (the fast form there).
    pub fn compare_form(&self, form: Form, device: &Device, dtype: DType) -> Result<Comparison> {
        let (fast_out, fast_grads) = self.run(Form::Fast, &Device::Cpu, dtype)?;
        let (generic_out, generic_grads) = self.run(form, device, dtype)?;
        let worst = |a: &[Tensor], b: &[Tensor]| -> Result<f64> {
            let mut worst = 0f64;
            for (a, b) in a.iter().zip(b) {
                worst = worst.max(relative_error(a, b)?);
            }
            Ok(worst)
        };
        Ok(Comparison {
            name: self.name.clone(),
            value_error: worst(&generic_out, &fast_out)?,
            grad_error: worst(&generic_grads, &fast_grads)?,
            tolerance: tolerance(dtype),
        })
    }
}

fn phi_name(phi: FeatureMap) -> &'static str {
    match phi {
        FeatureMap::EluPlusOne => "elu+1",
        FeatureMap::Relu => "relu",
    }
}

/// Every op's cases, at odd sizes that reach each of the fast kernels' paths.
pub fn cases() -> Result<Vec<Case>> {
    let u = |shape: &[usize], seed| uniform(shape, -1.0, 1.0, seed);
    let pos = |shape: &[usize], seed| uniform(shape, 0.5, 1.5, seed);
    let mut cases = Vec::new();

    // The conv: im2col (few channels, odd map), Winograd (c_in >= 32, a batch of at least one
    // image per thread), the dense form (maps of at most 2x2); with and without ReLU and bias.
    let threads = rayon::current_num_threads().max(1);
    for (label, x, c_out, relu, bias) in [
        ("im2col 7x9", [3, 5, 7, 9], 6, true, true),
        ("im2col, no bias, no relu", [2, 3, 5, 6], 4, false, false),
        ("winograd 6x5", [threads + 1, 32, 6, 5], 33, true, true),
        ("dense 2x2", [3, 8, 2, 2], 5, false, true),
    ] {
        let c_in = x[1];
        let mut inputs = vec![u(&x, 1)?, (u(&[c_out, c_in, 3, 3], 2)? * 0.3)?];
        if bias {
            inputs.push(u(&[c_out], 3)?);
        }
        cases.push(Case::new(format!("conv3x3 {label}"), inputs, move |t| {
            Ok(vec![crate::conv::conv3x3(&t[0], &t[1], t.get(2), relu)?])
        }));
    }

    // BatchNorm + ReLU in training mode, running statistics included.
    cases.push(Case::new(
        "batch_norm_relu_train 7x9",
        vec![u(&[3, 5, 7, 9], 4)?, pos(&[5], 5)?, u(&[5], 6)?],
        |t| {
            let stats = |init: f64| Var::from_tensor(&(t[1].zeros_like()? + init)?);
            let (mean, var) = (stats(0.1)?, stats(0.9)?);
            let bn = BatchNorm::new(
                5,
                mean.as_tensor().clone(),
                var.as_tensor().clone(),
                t[1].clone(),
                t[2].clone(),
                1e-5,
            )?;
            let y = crate::norm::batch_norm_relu_train(&bn, &t[0])?;
            Ok(vec![y, mean.as_tensor().copy()?, var.as_tensor().copy()?])
        },
    ));

    // BatchNorm + ReLU in evaluation mode (the running statistics are not differentiated).
    cases.push(Case::new(
        "batch_norm_relu_eval 7x9",
        vec![
            u(&[3, 5, 7, 9], 4)?,
            pos(&[5], 5)?,
            u(&[5], 6)?,
            (u(&[5], 13)? * 0.2)?,
            pos(&[5], 14)?,
        ],
        |t| {
            let bn = BatchNorm::new(
                5,
                t[3].detach(),
                t[4].detach(),
                t[1].clone(),
                t[2].clone(),
                1e-5,
            )?;
            Ok(vec![crate::norm::batch_norm_relu_eval(&bn, &t[0])?])
        },
    ));

    // The loss, against soft targets with label smoothing and against one-hot rows without
    // (the targets are data, not differentiated).
    let soft = pos(&[7, 13], 15)?;
    let soft = soft.broadcast_div(&soft.sum_keepdim(1)?)?;
    let one_hot = Tensor::from_vec(
        (0..7 * 13)
            .map(|i| f64::from(u8::from(i % 13 == (i / 13 * 5) % 13)))
            .collect::<Vec<_>>(),
        (7, 13),
        &Device::Cpu,
    )?;
    for (label, targets, smoothing) in [
        ("soft targets, smoothing 0.1", soft, 0.1),
        ("one-hot", one_hot, 0.0),
    ] {
        cases.push(Case::new(
            format!("cross_entropy 7x13 {label}"),
            vec![(u(&[7, 13], 16)? * 3.0)?, targets],
            move |t| {
                Ok(vec![crate::loss::cross_entropy(
                    &t[0],
                    &t[1].detach(),
                    smoothing,
                )?])
            },
        ));
    }

    // Max-pool: distinct values, then many ties (values on a grid of three), odd sizes.
    cases.push(Case::new(
        "max_pool_2x2 7x9",
        vec![u(&[2, 3, 7, 9], 7)?],
        |t| Ok(vec![crate::pool::max_pool_2x2(&t[0])?]),
    ));
    let ties = ((u(&[2, 3, 6, 5], 8)? + 1.0)?.round()? * 0.5)?;
    cases.push(Case::new("max_pool_2x2 ties", vec![ties], |t| {
        Ok(vec![crate::pool::max_pool_2x2(&t[0])?])
    }));
    cases.push(Case::new(
        "adaptive_avg_pool2d 5x7 -> 3",
        vec![u(&[2, 3, 5, 7], 9)?],
        |t| Ok(vec![crate::pool::adaptive_avg_pool2d(&t[0], 3)?]),
    ));

    // The bias along channels of a map and along the last axis of tokens.
    for (label, x, axis) in [("channels", [3, 5, 7], 1), ("tokens", [4, 6, 5], 2)] {
        cases.push(Case::new(
            format!("add_bias {label}"),
            vec![u(&x, 10)?, u(&[x[axis]], 11)?],
            move |t| Ok(vec![crate::bias::add_bias(&t[0], &t[1], axis)?]),
        ));
    }

    // A projection between every pair of orders: a batch of maps per thread and more, and
    // one map (the gemm's own threads).
    use crate::projection::{project, Order};
    for (from, to) in [
        (Order::Channels, Order::Tokens),
        (Order::Tokens, Order::Channels),
        (Order::Channels, Order::Channels),
        (Order::Tokens, Order::Tokens),
    ] {
        for batch in [1, threads + 1] {
            let (c_in, c_out, n) = (7, 5, 37);
            let x = match from {
                Order::Channels => u(&[batch, c_in, n], 40)?,
                Order::Tokens => u(&[batch, n, c_in], 40)?,
            };
            cases.push(Case::new(
                format!("project {from:?} -> {to:?}, batch {batch}"),
                vec![x, u(&[c_out, c_in], 41)?, u(&[c_out], 42)?],
                move |t| Ok(vec![project(&t[0], &t[1], &t[2], from, to)?]),
            ));
        }
    }

    // Softmax attention: one chunk, and many chunks of the generic form.
    let qkv = |n: usize, d: usize, c: usize| -> Result<Vec<Tensor>> {
        Ok(vec![
            u(&[2, n, d], 12)?,
            u(&[2, n, d], 13)?,
            u(&[2, n, c], 14)?,
        ])
    };
    // Values wider than one column chunk of the CUDA kernels (128 in f32, 64 in f64).
    cases.push(Case::new(
        "softmax_attention n=40, values 150 wide",
        qkv(40, 9, 150)?,
        |t| {
            Ok(vec![crate::softmax_attention::softmax_attention(
                &t[0], &t[1], &t[2], 0.3,
            )?])
        },
    ));
    cases.push(Case::new("softmax_attention n=37", qkv(37, 5, 7)?, |t| {
        Ok(vec![crate::softmax_attention::softmax_attention(
            &t[0], &t[1], &t[2], 0.45,
        )?])
    }));
    cases.push(Case::new(
        "softmax_attention n=300 (chunks of 64)",
        qkv(300, 3, 4)?,
        |t| {
            let out = if crate::form::form()? == Form::Generic {
                crate::softmax_attention::softmax_attention_chunked_by(
                    &t[0], &t[1], &t[2], 0.6, 64,
                )?
            } else {
                crate::softmax_attention::softmax_attention(&t[0], &t[1], &t[2], 0.6)?
            };
            Ok(vec![out])
        },
    ));

    // Linear attention: the packed op (d below and above the gemm threshold), the module's
    // folded ops and inference's projection.
    for phi in [FeatureMap::EluPlusOne, FeatureMap::Relu] {
        let eps = 1e-6;
        for d in [5, 16] {
            cases.push(Case::new(
                format!("linear_attention {} d={d}", phi_name(phi)),
                vec![
                    u(&[2, d, 37], 15)?,
                    u(&[2, d, 37], 16)?,
                    u(&[2, 7, 37], 17)?,
                ],
                move |t| {
                    Ok(vec![crate::linear::linear_attention(
                        &t[0], &t[1], &t[2], phi, eps,
                    )?])
                },
            ));
        }
        cases.push(Case::new(
            format!("folded_output {}", phi_name(phi)),
            vec![
                u(&[2, 5, 37], 18)?,
                u(&[2, 7, 5], 19)?,
                (pos(&[2, 5], 20)? * 37.0)?,
            ],
            move |t| {
                Ok(vec![crate::linear::folded_output(
                    &t[0], &t[1], &t[2], phi, eps,
                )?])
            },
        ));
        cases.push(Case::new(
            format!("folded_output_residual {}", phi_name(phi)),
            vec![
                u(&[2, 5, 37], 21)?,
                u(&[2, 7, 5], 22)?,
                (pos(&[2, 5], 23)? * 37.0)?,
                u(&[7], 24)?,
                u(&[2, 7, 37], 25)?,
            ],
            move |t| {
                Ok(vec![crate::linear::folded_output_residual(
                    &t[0], &t[1], &t[2], &t[3], &t[4], phi, eps,
                )?])
            },
        ));
        cases.push(
            Case::new(
                format!("project_context {}", phi_name(phi)),
                vec![u(&[2, 7, 37], 26)?, u(&[10, 7], 27)?, u(&[10], 28)?],
                move |t| {
                    let (q, a, s) = crate::linear::project_context(&t[0], &t[1], &t[2], phi)?;
                    Ok(vec![q, a, s])
                },
            )
            .without_backward(),
        );
    }
    for d in [5, 16] {
        cases.push(Case::new(
            format!("token_context d={d}"),
            vec![pos(&[2, d, 37], 29)?, u(&[2, 7, 37], 30)?],
            |t| Ok(vec![crate::linear::token_context(&t[0], &t[1])?]),
        ));
    }
    cases.push(Case::new(
        "efficient_attention",
        vec![
            u(&[2, 5, 37], 31)?,
            u(&[2, 5, 37], 32)?,
            u(&[2, 7, 37], 33)?,
        ],
        |t| {
            Ok(vec![crate::efficient::efficient_attention(
                &t[0], &t[1], &t[2],
            )?])
        },
    ));
    Ok(cases)
}

/// Every case's comparison on `device` in `dtype`: the generic form against the fast CPU
/// kernels and, on a GPU, the GPU's own kernels (its fast form) too, named "... (fast form)".
pub fn compare_all(device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    let forms: &[Form] = if device.is_cpu() {
        &[Form::Generic]
    } else {
        &[Form::Generic, Form::Fast]
    };
    let mut comparisons = Vec::new();
    for case in cases()? {
        for &form in forms {
            let mut comparison = case.compare_form(form, device, dtype).map_err(|e| {
                candle_core::Error::Msg(format!("{} ({} form): {e}", case.name, form.name()))
            })?;
            if form == Form::Fast {
                comparison.name = format!("{} (fast form)", case.name);
            }
            comparisons.push(comparison);
        }
    }
    Ok(comparisons)
}

/// The in-place updates and reductions over many tensors (SGD for several parameters at once,
/// AdamW, the sums of squares) in `form` on `device` against the fast form on the CPU, in
/// `dtype`: what the optimiser and the trainer's gradient check run each step (on a GPU one
/// launch for all the parameters). `value_error` is the largest over the updated tensors;
/// there are no gradients.
pub fn compare_updates(form: Form, device: &Device, dtype: DType) -> Result<Vec<Comparison>> {
    use crate::adamw::{AdamWStep, AdamWUpdate};
    use crate::sgd::{apply_many, SgdStep, SgdUpdate};
    // Three parameters of odd sizes (one past a chunk of the CUDA kernels), with their own
    // rates as parameter groups give them.
    let lens = [7, (1 << 16) + 3, 1];
    let make = |seed: u64| -> Result<Vec<[Tensor; 3]>> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| {
                let s = seed + 3 * i as u64;
                Ok([
                    uniform(&[n], -1.0, 1.0, s)?.to_dtype(dtype)?,
                    uniform(&[n], -1.0, 1.0, s + 1)?.to_dtype(dtype)?,
                    uniform(&[n], 0.0, 0.1, s + 2)?.to_dtype(dtype)?,
                ])
            })
            .collect()
    };
    let reference = make(200)?;
    let on = |d: &Device| -> Result<Vec<[Tensor; 3]>> {
        reference
            .iter()
            .map(|ts| {
                Ok([
                    ts[0].to_device(d)?,
                    ts[1].to_device(d)?,
                    ts[2].to_device(d)?,
                ])
            })
            .collect()
    };
    let steps = [(0.1, 5e-4), (0.05, 5e-4), (0.2, 0.0)].map(|(lr, weight_decay)| SgdStep {
        lr,
        momentum: 0.9,
        weight_decay,
        nesterov: true,
    });
    let sgd = |params: &[[Tensor; 3]]| -> Result<()> {
        let updates: Vec<SgdUpdate> = params
            .iter()
            .zip(steps)
            .map(|([w, g, b], step)| SgdUpdate {
                step,
                w,
                grad: g,
                buf: b,
            })
            .collect();
        apply_many(&updates)
    };
    // AdamW over the three parameters at once (own learning rates), each with a second
    // moment made from its gradient; returns the second moments.
    let adamw = |params: &[[Tensor; 3]]| -> Result<Vec<Tensor>> {
        let moments = params
            .iter()
            .map(|[_, g, _]| g.sqr()? * 0.01)
            .collect::<Result<Vec<_>>>()?;
        let updates: Vec<AdamWUpdate> = params
            .iter()
            .zip(&moments)
            .zip([0.01, 0.002, 0.02])
            .map(|(([w, g, m], v), lr)| AdamWUpdate {
                step: AdamWStep {
                    lr,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.05,
                    step: 3,
                },
                w,
                grad: g,
                m,
                v,
            })
            .collect();
        crate::adamw::apply_many(&updates)?;
        Ok(moments)
    };
    let run = |d: &Device, f: Form| -> Result<(Vec<Tensor>, Vec<Tensor>, Vec<f64>)> {
        with_form(f, || {
            let sgd_params = on(d)?;
            sgd(&sgd_params)?;
            let adamw_params = on(d)?;
            let moments = adamw(&adamw_params)?;
            let grads: Vec<&Tensor> = adamw_params.iter().map(|p| &p[1]).collect();
            let squares = crate::squares::sums_of_squares(&grads)?;
            let flat = |ps: &[[Tensor; 3]]| ps.iter().flat_map(|p| p.clone()).collect::<Vec<_>>();
            let mut adamw_out = flat(&adamw_params);
            adamw_out.extend(moments);
            Ok((flat(&sgd_params), adamw_out, squares))
        })
    };
    let (sgd_ref, adamw_ref, squares_ref) = run(&Device::Cpu, Form::Fast)?;
    let (sgd_out, adamw_out, squares_out) = run(device, form)?;
    let worst = |a: &[Tensor], b: &[Tensor]| -> Result<f64> {
        let mut worst = 0f64;
        for (a, b) in a.iter().zip(b) {
            worst = worst.max(relative_error(a, b)?);
        }
        Ok(worst)
    };
    let squares_error = squares_out
        .iter()
        .zip(&squares_ref)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f64, f64::max);
    let comparison = |name: &str, value_error: f64| Comparison {
        name: name.to_string(),
        value_error,
        grad_error: 0.0,
        tolerance: tolerance(dtype),
    };
    Ok(vec![
        comparison(
            "sgd over 3 parameters (momentum, Nesterov, own rates)",
            worst(&sgd_out, &sgd_ref)?,
        ),
        comparison(
            "adamw over 3 parameters (own rates)",
            worst(&adamw_out, &adamw_ref)?,
        ),
        comparison("sums of squares of 3 tensors", squares_error),
    ])
}

/// The device the tests run on: `LA_TEST_DEVICE` (`cpu`, the default, or `cuda` / `cuda:N`),
/// so that the same suite runs on a GPU.
pub fn test_device() -> Result<Device> {
    match std::env::var("LA_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Ok(Device::Cpu),
        Ok("cuda") => Device::new_cuda(0),
        Ok(other) => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Device::new_cuda(ordinal),
            _ => candle_core::bail!("LA_TEST_DEVICE={other}: expected cpu, cuda or cuda:N"),
        },
    }
}
