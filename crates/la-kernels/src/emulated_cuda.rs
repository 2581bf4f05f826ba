//! Tests of the CUDA kernels' own code, run on the CPU: `cuda/emulation/harness.cpp` includes
//! every `cuda/*.cu` under `cuda/emulation/shim.h` (a block's threads as OS threads, so the
//! reductions' barriers and shared memory are real), and these tests compare what it prints
//! with the fast CPU kernels. The index arithmetic, the tie and mask rules and the chunked
//! reduction are so checked on every machine; what only a GPU can check (the launches, cuDNN)
//! is `la-cli selftest --device cuda`'s.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};

use crate::cuda::plan::{channel_chunks, elementwise_blocks, GemmShape};
use crate::parity::{relative_error, uniform};

/// The harness, compiled once per test run with the machine's g++.
fn harness() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda/emulation");
        let out =
            std::env::temp_dir().join(format!("la-kernels-cuda-harness-{}", std::process::id()));
        let status = Command::new("g++")
            .args([
                "-std=c++20",
                "-O1",
                "-pthread",
                "-Wall",
                "-Wno-unknown-pragmas",
                "-o",
            ])
            .arg(&out)
            .arg(dir.join("harness.cpp"))
            .status()
            .expect("g++ runs (the CUDA kernels' CPU emulation needs a C++20 compiler)");
        assert!(status.success(), "g++ failed on the CUDA emulation harness");
        out
    })
}

/// Runs the harness with `args`, feeding `inputs`, and returns the numbers it printed.
fn run(args: &[String], inputs: &[&Tensor]) -> Vec<f64> {
    let mut stdin = String::new();
    for t in inputs {
        for v in t.flatten_all().unwrap().to_vec1::<f64>().unwrap() {
            stdin.push_str(&format!("{v:?}\n"));
        }
    }
    let mut child = Command::new(harness())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the harness starts");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "harness {args:?} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// The next `shape`-sized tensor of `values`.
fn take(values: &mut &[f64], shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let (head, rest) = values.split_at(n);
    *values = rest;
    Tensor::from_slice(head, shape, &Device::Cpu).unwrap()
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let err = relative_error(ours, reference).unwrap();
    assert!(err <= 1e-12, "{what}: error {err:e}");
}

#[test]
fn max_pool_kernels_match_the_cpu_kernel_with_ties_and_odd_sizes() {
    let grid_for = |total: usize| elementwise_blocks(total).min(3);
    let ties = ((uniform(&[2, 3, 6, 5], -1.0, 1.0, 8).unwrap() + 1.0)
        .unwrap()
        .round()
        .unwrap()
        * 0.5)
        .unwrap();
    for (label, x) in [
        (
            "distinct 7x9",
            uniform(&[2, 3, 7, 9], -1.0, 1.0, 7).unwrap(),
        ),
        ("ties 6x5", ties),
        ("one window", uniform(&[1, 1, 2, 2], -1.0, 1.0, 3).unwrap()),
    ] {
        let (b, c, h, w) = x.dims4().unwrap();
        let grad_y = uniform(&[b, c, h / 2, w / 2], -1.0, 1.0, 9).unwrap();
        let args = [b, c, h, w, grid_for(b * c * h * w) as usize].map(|v| v.to_string());
        let out = run(&[&["pool".to_string()][..], &args].concat(), &[&x, &grad_y]);
        let mut values = &out[..];
        let y = take(&mut values, grad_y.dims());
        let grad_x = take(&mut values, x.dims());
        assert!(values.is_empty());

        let var = Var::from_tensor(&x).unwrap();
        let reference = crate::pool::max_pool_2x2(var.as_tensor()).unwrap();
        let grads = (&reference * &grad_y)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_close(&format!("pool {label} values"), &y, &reference);
        assert_close(
            &format!("pool {label} gradient"),
            &grad_x,
            grads.get(var.as_tensor()).unwrap(),
        );
    }
}

#[test]
fn bias_kernels_match_the_cpu_ops_over_chunks_and_axes() {
    // (outer, len, inner): channels of a map, tokens (inner 1), one element a channel.
    for (outer, len, inner) in [(3, 5, 37), (40, 6, 1), (1, 4, 1)] {
        let count = outer * inner;
        for relu in [false, true] {
            for per_chunk in [channel_chunks(count).per_chunk, 7] {
                let shape = [outer, len, inner];
                let x = uniform(&shape, -1.0, 1.0, 10).unwrap();
                let bias = uniform(&[len], -0.5, 0.5, 11).unwrap();
                let grad = uniform(&shape, -1.0, 1.0, 12).unwrap();
                let grid = elementwise_blocks(x.elem_count()).min(2);
                let args = ["bias".to_string()]
                    .into_iter()
                    .chain(
                        [outer, len, inner, relu as usize, per_chunk, grid as usize]
                            .map(|v| v.to_string()),
                    )
                    .collect::<Vec<_>>();
                let out = run(&args, &[&x, &bias, &grad]);
                let mut values = &out[..];
                let y = take(&mut values, &shape);
                let in_place = take(&mut values, &shape);
                let masked = take(&mut values, &shape);
                let bias_grad = take(&mut values, &[len]);
                assert!(values.is_empty());

                let what = format!("bias {shape:?} relu={relu} per_chunk={per_chunk}");
                let sum = crate::bias::add_bias(&x, &bias, 1).unwrap();
                let reference = if relu { sum.relu().unwrap() } else { sum };
                assert_close(&format!("{what}: forward"), &y, &reference);
                assert_close(&format!("{what}: in place"), &in_place, &reference);
                let reference_masked = if relu {
                    (&grad * reference.gt(0.0).unwrap().to_dtype(DType::F64).unwrap()).unwrap()
                } else {
                    grad.clone()
                };
                assert_close(
                    &format!("{what}: masked gradient"),
                    &masked,
                    &reference_masked,
                );
                let reference_bias_grad = reference_masked.sum(2).unwrap().sum(0).unwrap();
                assert_close(
                    &format!("{what}: bias gradient"),
                    &bias_grad,
                    &reference_bias_grad,
                );
            }
        }
    }
}

#[test]
fn sgd_kernels_match_the_cpu_passes() {
    let n = 1000;
    for nesterov in [false, true] {
        let (lr, momentum, weight_decay) = (0.05, 0.9, 5e-4);
        let w = uniform(&[n], -1.0, 1.0, 20).unwrap();
        let grad = uniform(&[n], -1.0, 1.0, 21).unwrap();
        let buf = uniform(&[n], -0.1, 0.1, 22).unwrap();
        let args = [
            "sgd".to_string(),
            n.to_string(),
            lr.to_string(),
            momentum.to_string(),
            weight_decay.to_string(),
            (nesterov as u8).to_string(),
            elementwise_blocks(n).min(2).to_string(),
        ];
        let out = run(&args, &[&w, &grad, &buf]);
        let mut values = &out[..];
        let new_buf = take(&mut values, &[n]);
        let new_w = take(&mut values, &[n]);
        assert!(values.is_empty());

        let (w_ref, buf_ref) = (w.copy().unwrap(), buf.copy().unwrap());
        let step = crate::sgd::SgdStep {
            lr,
            momentum,
            weight_decay,
            nesterov,
        };
        step.apply(&w_ref, &grad, &buf_ref).unwrap();
        assert_close(
            &format!("sgd nesterov={nesterov}: buffer"),
            &new_buf,
            &buf_ref,
        );
        assert_close(&format!("sgd nesterov={nesterov}: weight"), &new_w, &w_ref);
    }
}

#[test]
fn batch_norm_kernels_match_the_cpu_kernel_over_chunks() {
    let (momentum, eps) = (0.1, 1e-5);
    // (b, c, hw): several chunks a channel at the small chunk size; one value a channel;
    // an offset mean, where a one-pass variance would lose digits.
    for (b, c, hw, offset) in [(3, 4, 37, 0.0), (2, 3, 1, 0.0), (4, 2, 25, 1e3)] {
        let count = b * hw;
        for per_chunk in [channel_chunks(count).per_chunk, 7] {
            let shape = [b, c, hw];
            let x = (uniform(&shape, -1.0, 1.0, 30).unwrap() + offset).unwrap();
            let weight = uniform(&[c], 0.5, 1.5, 31).unwrap();
            let bias = uniform(&[c], -0.5, 0.5, 32).unwrap();
            let grad = uniform(&shape, -1.0, 1.0, 33).unwrap();
            let running_mean = uniform(&[c], -0.2, 0.2, 34).unwrap();
            let running_var = uniform(&[c], 0.5, 1.5, 35).unwrap();
            let grid = elementwise_blocks(x.elem_count()).min(2);
            let args = ["bn".to_string()]
                .into_iter()
                .chain([b, c, hw, per_chunk, grid as usize].map(|v| v.to_string()))
                .chain([momentum.to_string()])
                .collect::<Vec<_>>();
            let inputs = [&x, &weight, &bias, &grad, &running_mean, &running_var];
            let out = run(&args, &inputs);
            let mut values = &out[..];
            let y = take(&mut values, &shape);
            let stats = take(&mut values, &[2 * c]);
            let dx = take(&mut values, &shape);
            let dweight = take(&mut values, &[c]);
            let dbias = take(&mut values, &[c]);
            let new_mean = take(&mut values, &[c]);
            let new_var = take(&mut values, &[c]);
            let y_eval = take(&mut values, &shape);
            assert!(values.is_empty());

            // The CPU kernel on the same map as [b, c, hw, 1].
            let map = |t: &Tensor| t.reshape((b, c, hw, 1)).unwrap();
            let (mean_var, var_var) = (
                Var::from_tensor(&running_mean).unwrap(),
                Var::from_tensor(&running_var).unwrap(),
            );
            let (x_var, w_var, b_var) = (
                Var::from_tensor(&map(&x)).unwrap(),
                Var::from_tensor(&weight).unwrap(),
                Var::from_tensor(&bias).unwrap(),
            );
            let bn = candle_nn::BatchNorm::new_with_momentum(
                c,
                mean_var.as_tensor().clone(),
                var_var.as_tensor().clone(),
                w_var.as_tensor().clone(),
                b_var.as_tensor().clone(),
                eps,
                momentum,
            )
            .unwrap();
            let reference = crate::norm::batch_norm_relu_train(&bn, x_var.as_tensor()).unwrap();
            let grads = (&reference * map(&grad))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let what = format!("batch norm {shape:?} per_chunk={per_chunk} offset={offset}");
            let close = |name: &str, ours: &Tensor, reference: &Tensor| {
                let reference = reference.reshape(ours.dims()).unwrap();
                assert_close(&format!("{what}: {name}"), ours, &reference)
            };
            close("forward", &y, &reference);
            let x3 = x.transpose(0, 1).unwrap().flatten_from(1).unwrap();
            let mean = x3.mean(1).unwrap();
            let var = x3
                .broadcast_sub(&mean.unsqueeze(1).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean(1)
                .unwrap();
            close(
                "statistics",
                &stats,
                &Tensor::cat(&[&mean, &var], 0).unwrap(),
            );
            close("dx", &dx, grads.get(x_var.as_tensor()).unwrap());
            close("dweight", &dweight, grads.get(w_var.as_tensor()).unwrap());
            close("dbias", &dbias, grads.get(b_var.as_tensor()).unwrap());
            close("running mean", &new_mean, mean_var.as_tensor());
            close("running var", &new_var, var_var.as_tensor());
            let eval = candle_nn::ModuleT::forward_t(&bn, &map(&x), false)
                .unwrap()
                .relu()
                .unwrap();
            close("evaluation", &y_eval, &eval);
        }
    }
}

#[test]
fn cross_entropy_kernels_match_the_generic_loss() {
    // Classes fewer than a block's threads, and more (several per thread); soft targets that
    // do not sum to one (the gradient's sum t' term); large logits (the max's shift).
    for (rows, k, smoothing, scale) in [(5, 13, 0.1, 3.0), (3, 300, 0.0, 1.0), (2, 7, 0.2, 80.0)] {
        let logits = (uniform(&[rows, k], -1.0, 1.0, 40).unwrap() * scale).unwrap();
        let targets = uniform(&[rows, k], 0.0, 0.3, 41).unwrap();
        let grad = Tensor::new(0.7f64, &Device::Cpu).unwrap();
        let grid = elementwise_blocks(rows * k).min(2);
        let args = [
            "ce".to_string(),
            rows.to_string(),
            k.to_string(),
            smoothing.to_string(),
            grid.to_string(),
        ];
        let out = run(&args, &[&logits, &targets, &grad]);
        let mut values = &out[..];
        let loss = take(&mut values, &[]);
        let dlogits = take(&mut values, &[rows, k]);
        assert!(values.is_empty());

        let var = Var::from_tensor(&logits).unwrap();
        let reference =
            crate::loss::cross_entropy_generic(var.as_tensor(), &targets, smoothing).unwrap();
        let grads = (&reference * 0.7).unwrap().backward().unwrap();
        let what = format!("cross-entropy {rows}x{k} smoothing {smoothing} scale {scale}");
        assert_close(&format!("{what}: loss"), &loss, &reference);
        assert_close(
            &format!("{what}: gradient"),
            &dlogits,
            grads.get(var.as_tensor()).unwrap(),
        );
    }
}

#[test]
fn attention_kernels_match_the_cpu_kernel() {
    // (b, n, d, c, chunk): partial tiles of queries and keys, values narrower than a chunk,
    // several chunks with a partial last one, the widest query/key rows.
    for (b, n, d, c, chunk) in [
        (2, 37, 5, 7, 16),
        (1, 16, 3, 40, 16),
        (1, 21, 64, 70, 32),
        (2, 5, 8, 64, 64),
    ] {
        let scale = 0.37;
        let q = uniform(&[b, n, d], -1.0, 1.0, 50).unwrap();
        let k = uniform(&[b, n, d], -1.0, 1.0, 51).unwrap();
        let v = uniform(&[b, n, c], -1.0, 1.0, 52).unwrap();
        let dout = uniform(&[b, n, c], -1.0, 1.0, 53).unwrap();
        let args = ["attn".to_string()]
            .into_iter()
            .chain([b, n, d, c, chunk].map(|v| v.to_string()))
            .chain([scale.to_string()])
            .collect::<Vec<_>>();
        let out = run(&args, &[&q, &k, &v, &dout]);
        let mut values = &out[..];
        let y = take(&mut values, &[b, n, c]);
        let _lse = take(&mut values, &[b, n]);
        let dq = take(&mut values, &[b, n, d]);
        let dk = take(&mut values, &[b, n, d]);
        let dv = take(&mut values, &[b, n, c]);
        assert!(values.is_empty());

        let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
        let reference = crate::softmax_attention::softmax_attention(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            scale,
        )
        .unwrap();
        let grads = (&reference * &dout)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let what = format!("attention b={b} n={n} d={d} c={c} chunk={chunk}");
        assert_close(&format!("{what}: output"), &y, &reference);
        for (name, ours, var) in [
            ("dq", &dq, &vars[0]),
            ("dk", &dk, &vars[1]),
            ("dv", &dv, &vars[2]),
        ] {
            assert_close(
                &format!("{what}: {name}"),
                ours,
                grads.get(var.as_tensor()).unwrap(),
            );
        }
    }
}

/// `plan::chunk_table` for tensors of `lens` as harness input (the harness fills in its own
/// pointers), and the number of chunks.
fn table_for_harness(lens: &[usize], columns: usize) -> (Tensor, usize) {
    let (table, chunks) = crate::cuda::plan::chunk_table(lens, columns);
    let values: Vec<f64> = table.iter().map(|&v| v as f64).collect();
    let len = values.len();
    (Tensor::from_vec(values, len, &Device::Cpu).unwrap(), chunks)
}

/// Runs `gemm.cu`'s product `shape` over `batch` on the harness: `c` holds C's start.
fn gemm(shape: GemmShape, batch: usize, [a, b, c, bias]: [&Tensor; 4]) -> Tensor {
    let s = shape;
    let fields = [
        s.m,
        s.n,
        s.k_outer,
        s.k_inner,
        s.a_batch,
        s.a_row,
        s.a_k_outer,
        s.a_k_inner,
        s.b_batch,
        s.b_k_outer,
        s.b_k_inner,
        s.b_col,
        s.c_batch,
        s.c_row,
        s.c_col,
        i64::from(s.bias_rows),
        i64::from(s.accumulate),
    ];
    let args = ["gemm".to_string()]
        .into_iter()
        .chain(
            [
                batch,
                a.elem_count(),
                b.elem_count(),
                c.elem_count(),
                bias.elem_count(),
            ]
            .map(|v| v.to_string()),
        )
        .chain(fields.map(|v| v.to_string()))
        .collect::<Vec<_>>();
    let out = run(&args, &[a, b, c, bias]);
    Tensor::from_vec(out, c.dims(), &Device::Cpu).unwrap()
}

#[test]
fn projection_products_match_the_cpu_projection_in_every_order() {
    use crate::cuda::plan::projection_products;
    use crate::projection::{project, Order};
    // Sizes past one 64 x 64 tile and a 16-deep step of k, and odd ones.
    for (batch, c_in, c_out, positions) in [(2, 5, 7, 9), (3, 70, 20, 33), (2, 17, 66, 80)] {
        for (from, to) in [
            (Order::Channels, Order::Tokens),
            (Order::Tokens, Order::Channels),
            (Order::Channels, Order::Channels),
            (Order::Tokens, Order::Tokens),
        ] {
            let x_dims = |order: Order, c: usize| match order {
                Order::Channels => vec![batch, c, positions],
                Order::Tokens => vec![batch, positions, c],
            };
            let x = uniform(&x_dims(from, c_in), -1.0, 1.0, 60).unwrap();
            let w = uniform(&[c_out, c_in], -1.0, 1.0, 61).unwrap();
            let bias = uniform(&[c_out], -1.0, 1.0, 62).unwrap();
            let dy = uniform(&x_dims(to, c_out), -1.0, 1.0, 63).unwrap();
            let p = projection_products([batch, c_in, c_out, positions], from, to);
            let y = gemm(p.forward, batch, [&w, &x, &dy.zeros_like().unwrap(), &bias]);
            let dx = gemm(
                p.input_grad,
                batch,
                [&w, &dy, &x.zeros_like().unwrap(), &bias],
            );
            let dw = gemm(p.weight_grad, 1, [&dy, &x, &w.zeros_like().unwrap(), &bias]);

            let vars = [&x, &w, &bias].map(|t| Var::from_tensor(t).unwrap());
            let reference = project(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                from,
                to,
            )
            .unwrap();
            let grads = (&reference * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let what =
                format!("projection {from:?} -> {to:?} [{batch}, {c_in} -> {c_out}, {positions}]");
            assert_close(&format!("{what}: forward"), &y, &reference);
            assert_close(
                &format!("{what}: dx"),
                &dx,
                grads.get(vars[0].as_tensor()).unwrap(),
            );
            assert_close(
                &format!("{what}: dw"),
                &dw,
                grads.get(vars[1].as_tensor()).unwrap(),
            );
        }
    }
}

#[test]
fn adamw_kernels_match_the_cpu_passes() {
    let n = 700;
    let step = crate::adamw::AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
        step: 3,
    };
    let w = uniform(&[n], -1.0, 1.0, 70).unwrap();
    let grad = uniform(&[n], -1.0, 1.0, 71).unwrap();
    let m = uniform(&[n], -0.1, 0.1, 72).unwrap();
    let v = uniform(&[n], 0.0, 0.01, 73).unwrap();
    let decay = 1.0 - step.lr * step.weight_decay;
    let step_size = step.lr / (1.0 - step.beta1.powi(step.step));
    let sqrt_bias2 = (1.0 - step.beta2.powi(step.step)).sqrt();
    let args = [
        "adamw".to_string(),
        n.to_string(),
        format!("{:?}", step.beta1),
        format!("{:?}", step.beta2),
        format!("{:?}", step.eps),
        format!("{decay:?}"),
        format!("{step_size:?}"),
        format!("{sqrt_bias2:?}"),
        elementwise_blocks(n).min(2).to_string(),
    ];
    let out = run(&args, &[&w, &grad, &m, &v]);
    let mut values = &out[..];
    let (new_m, new_v, new_w) = (
        take(&mut values, &[n]),
        take(&mut values, &[n]),
        take(&mut values, &[n]),
    );
    assert!(values.is_empty());
    let (w_ref, m_ref, v_ref) = (w.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
    step.apply(&w_ref, &grad, &m_ref, &v_ref).unwrap();
    assert_close("adamw: first moment", &new_m, &m_ref);
    assert_close("adamw: second moment", &new_v, &v_ref);
    assert_close("adamw: weight", &new_w, &w_ref);
}

#[test]
fn sums_of_squares_kernels_match_the_candle_ops() {
    use crate::cuda::plan::SQUARES_CHUNK;
    let lens = [5, SQUARES_CHUNK + 3, 1, 300];
    let tensors: Vec<Tensor> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| uniform(&[n], -2.0, 2.0, 80 + i as u64).unwrap())
        .collect();
    let (table, chunks) = table_for_harness(&lens, 1);
    let args = ["squares".to_string(), chunks.to_string()]
        .into_iter()
        .chain(lens.iter().map(|n| n.to_string()))
        .collect::<Vec<_>>();
    let inputs: Vec<&Tensor> = std::iter::once(&table).chain(&tensors).collect();
    let ours = run(&args, &inputs);
    let reference = crate::squares::sums_of_squares(&tensors.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(ours.len(), lens.len());
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs(),
            "tensor {i}: {a} against {b}"
        );
    }
}

#[test]
fn sgd_over_many_parameters_in_one_launch_matches_the_cpu_passes() {
    use crate::cuda::plan::SQUARES_CHUNK;
    let lens = [7, SQUARES_CHUNK + 5, 1];
    let (momentum, weight_decay) = (0.9, 5e-4);
    for nesterov in [false, true] {
        // Each parameter its own learning rate (parameter groups), one without decay.
        let rates = [[0.1, weight_decay], [0.05, weight_decay], [0.2, 0.0]];
        let params: Vec<[Tensor; 3]> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let seed = 90 + 3 * i as u64;
                [
                    uniform(&[n], -1.0, 1.0, seed).unwrap(),
                    uniform(&[n], -1.0, 1.0, seed + 1).unwrap(),
                    uniform(&[n], -0.1, 0.1, seed + 2).unwrap(),
                ]
            })
            .collect();
        let (table, chunks) = table_for_harness(&lens, 3);
        let rate_values: Vec<f64> = (0..2)
            .flat_map(|c| rates.iter().map(move |r| r[c]))
            .collect();
        let rate_tensor = Tensor::from_vec(rate_values, 2 * lens.len(), &Device::Cpu).unwrap();
        let args = [
            "sgdmany".to_string(),
            momentum.to_string(),
            (nesterov as u8).to_string(),
            chunks.to_string(),
        ]
        .into_iter()
        .chain(lens.iter().map(|n| n.to_string()))
        .collect::<Vec<_>>();
        let mut inputs = vec![&table, &rate_tensor];
        inputs.extend(params.iter().flatten());
        let out = run(&args, &inputs);
        let mut values = &out[..];
        let bufs: Vec<Tensor> = lens.iter().map(|&n| take(&mut values, &[n])).collect();
        let weights: Vec<Tensor> = lens.iter().map(|&n| take(&mut values, &[n])).collect();
        assert!(values.is_empty());
        for (i, ([w, grad, buf], [lr, wd])) in params.iter().zip(rates).enumerate() {
            let (w_ref, buf_ref) = (w.copy().unwrap(), buf.copy().unwrap());
            let step = crate::sgd::SgdStep {
                lr,
                momentum,
                weight_decay: wd,
                nesterov,
            };
            step.apply(&w_ref, grad, &buf_ref).unwrap();
            let what = format!("sgd over many, parameter {i}, nesterov={nesterov}");
            assert_close(&format!("{what}: buffer"), &bufs[i], &buf_ref);
            assert_close(&format!("{what}: weight"), &weights[i], &w_ref);
        }
    }
}

#[test]
fn cross_entropy_kernels_read_hard_labels_as_one_hot_rows() {
    for (rows, k, smoothing) in [(6, 11, 0.1), (3, 300, 0.0)] {
        let logits = (uniform(&[rows, k], -1.0, 1.0, 45).unwrap() * 4.0).unwrap();
        let labels: Vec<u32> = (0..rows).map(|r| ((r * 7 + 3) % k) as u32).collect();
        let label_values = Tensor::from_vec(
            labels.iter().map(|&l| f64::from(l)).collect::<Vec<_>>(),
            rows,
            &Device::Cpu,
        )
        .unwrap();
        let grad = Tensor::new(1.3f64, &Device::Cpu).unwrap();
        let args = [
            "celabels".to_string(),
            rows.to_string(),
            k.to_string(),
            smoothing.to_string(),
            elementwise_blocks(rows * k).min(2).to_string(),
        ];
        let out = run(&args, &[&logits, &label_values, &grad]);
        let mut values = &out[..];
        let loss = take(&mut values, &[]);
        let dlogits = take(&mut values, &[rows, k]);
        assert!(values.is_empty());

        let var = Var::from_tensor(&logits).unwrap();
        let labels = Tensor::from_vec(labels, rows, &Device::Cpu).unwrap();
        let reference =
            crate::loss::cross_entropy_labels(var.as_tensor(), &labels, smoothing).unwrap();
        let grads = (&reference * 1.3).unwrap().backward().unwrap();
        let what = format!("cross-entropy on labels {rows}x{k} smoothing {smoothing}");
        assert_close(&format!("{what}: loss"), &loss, &reference);
        assert_close(
            &format!("{what}: gradient"),
            &dlogits,
            grads.get(var.as_tensor()).unwrap(),
        );
    }
}

#[test]
fn adamw_over_many_parameters_in_one_launch_matches_the_cpu_passes() {
    use crate::cuda::plan::SQUARES_CHUNK;
    let lens = [9, SQUARES_CHUNK + 2, 1];
    let steps = [(0.01, 0.05), (0.002, 0.05), (0.02, 0.0)].map(|(lr, weight_decay)| {
        crate::adamw::AdamWStep {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 4,
        }
    });
    let params: Vec<[Tensor; 4]> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let seed = 120 + 4 * i as u64;
            [
                uniform(&[n], -1.0, 1.0, seed).unwrap(),
                uniform(&[n], -1.0, 1.0, seed + 1).unwrap(),
                uniform(&[n], -0.1, 0.1, seed + 2).unwrap(),
                uniform(&[n], 0.0, 0.01, seed + 3).unwrap(),
            ]
        })
        .collect();
    let (table, chunks) = table_for_harness(&lens, 4);
    let factors: Vec<f64> = steps
        .iter()
        .flat_map(|s| {
            [
                1.0 - s.lr * s.weight_decay,
                s.lr / (1.0 - s.beta1.powi(s.step)),
                (1.0 - s.beta2.powi(s.step)).sqrt(),
                s.eps,
            ]
        })
        .collect();
    let factors = Tensor::from_vec(factors, 4 * lens.len(), &Device::Cpu).unwrap();
    let args = [
        "adamwmany".to_string(),
        "0.9".into(),
        "0.999".into(),
        chunks.to_string(),
    ]
    .into_iter()
    .chain(lens.iter().map(|n| n.to_string()))
    .collect::<Vec<_>>();
    let mut inputs = vec![&table, &factors];
    inputs.extend(params.iter().flatten());
    let out = run(&args, &inputs);
    let mut values = &out[..];
    let mut take_all =
        || -> Vec<Tensor> { lens.iter().map(|&n| take(&mut values, &[n])).collect() };
    let (ms, vs, ws) = (take_all(), take_all(), take_all());
    assert!(values.is_empty());
    for (i, ([w, g, m, v], step)) in params.iter().zip(steps).enumerate() {
        let (w_ref, m_ref, v_ref) = (w.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
        step.apply(&w_ref, g, &m_ref, &v_ref).unwrap();
        let what = format!("adamw over many, parameter {i}");
        assert_close(&format!("{what}: first moment"), &ms[i], &m_ref);
        assert_close(&format!("{what}: second moment"), &vs[i], &v_ref);
        assert_close(&format!("{what}: weight"), &ws[i], &w_ref);
    }
}
