//! A VGG as an ONNX graph (opset [`OPSET`], inputs `[batch, 3, size, size]` f32 with the
//! batch left free, output `logits`), for onnxruntime and every runtime that reads ONNX.
//! Every attention kind is written as standard operators, in the same order of
//! operations as la-attention's plain form.

mod proto;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use la_attention::{AttentionConfig, AttentionKind};
use prost::Message;

use crate::config::VggConfig;
use crate::layers::LayerKind;
use crate::{Error, Result};
use proto::*;

/// The operator set the graph is written in.
pub const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;
const BATCH_NORM_EPS: f32 = 1e-5;

fn attribute_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: ATTRIBUTE_INTS,
        ..Default::default()
    }
}

fn attribute_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: value,
        r#type: ATTRIBUTE_INT,
        ..Default::default()
    }
}

fn attribute_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: value,
        r#type: ATTRIBUTE_FLOAT,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Some(v) => Dimension {
                dim_value: Some(*v),
                dim_param: None,
            },
            None => Dimension {
                dim_value: None,
                dim_param: Some("batch".into()),
            },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// Nodes and initialisers, each node's output named after the node.
struct GraphBuilder<'a> {
    tensors: &'a HashMap<String, Tensor>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl GraphBuilder<'_> {
    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let name = format!("{op}_{}", self.nodes.len());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            name: name.clone(),
            op_type: op.into(),
            attribute: attributes,
        });
        name
    }

    fn constant(&mut self, name: String, t: &Tensor) -> Result<String> {
        let t = t
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?;
        let raw: Vec<u8> = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        self.initializers.push(TensorProto {
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.clone(),
            raw_data: raw,
        });
        Ok(name)
    }

    fn ints(&mut self, name: &str, values: &[i64]) -> String {
        self.initializers.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    fn scalar(&mut self, name: &str, value: f32) -> String {
        self.initializers.push(TensorProto {
            dims: vec![],
            data_type: FLOAT,
            name: name.into(),
            raw_data: value.to_le_bytes().to_vec(),
        });
        name.into()
    }

    /// One of the model's tensors, under its own name.
    fn weight(&mut self, name: &str) -> Result<String> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Import {
            tensor: name.into(),
            reason: "missing from the model being exported".into(),
        })?;
        self.constant(name.into(), &t.clone())
    }

    /// A tensor of the model, transformed (a transposed weight, a bias as a column).
    fn derived(
        &mut self,
        name: &str,
        suffix: &str,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<String> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Import {
            tensor: name.into(),
            reason: "missing from the model being exported".into(),
        })?;
        let t = f(t)?;
        self.constant(format!("{name}.{suffix}"), &t)
    }

    /// phi(q)^T (phi(k) v^T) / (phi(q) . sum phi(k) + eps) for features [b, f, n] and
    /// values transposed [b, n, c] -> [b, c, n].
    fn kernel_attention(&mut self, layer: &str, q: &str, k: &str, vt: &str, eps: f64) -> String {
        let context = self.node("MatMul", &[k, vt], vec![]); // [b, f, c]
        let ct = self.transpose(&context);
        let numerator = self.node("MatMul", &[&ct, q], vec![]); // [b, c, n]
        let axis2 = self.ints(&format!("{layer}.axis2"), &[2]);
        let axis1 = self.ints(&format!("{layer}.axis1"), &[1]);
        let key_sum = self.node(
            "ReduceSum",
            &[k, &axis2],
            vec![attribute_int("keepdims", 1)],
        );
        let weighted = self.node("Mul", &[q, &key_sum], vec![]);
        let denominator = self.node(
            "ReduceSum",
            &[&weighted, &axis1],
            vec![attribute_int("keepdims", 1)],
        );
        let eps = self.scalar(&format!("{layer}.eps"), eps as f32);
        let denominator = self.node("Add", &[&denominator, &eps], vec![]);
        self.node("Div", &[&numerator, &denominator], vec![])
    }

    /// Performer's phi of `x` [b, d, n] with `features` [m, d], stabilised as la-attention's.
    fn positive_features(
        &mut self,
        layer: &str,
        which: &str,
        x: &str,
        features: &str,
        (m, d): (usize, usize),
        query: bool,
    ) -> String {
        let name = format!("{layer}.{which}");
        let scale = self.scalar(
            &format!("{name}.feature_scale"),
            (d as f64).powf(-0.25) as f32,
        );
        let x = self.node("Mul", &[x, &scale], vec![]);
        let projected = self.node("MatMul", &[features, &x], vec![]); // [b, m, n]
        let squares = self.node("Mul", &[&x, &x], vec![]);
        let axis1 = self.ints(&format!("{name}.axis1"), &[1]);
        let norm = self.node(
            "ReduceSum",
            &[&squares, &axis1],
            vec![attribute_int("keepdims", 1)],
        );
        let half = self.scalar(&format!("{name}.half"), 0.5);
        let half_norm = self.node("Mul", &[&norm, &half], vec![]);
        let exponent = self.node("Sub", &[&projected, &half_norm], vec![]);
        let axes: &[i64] = if query { &[1] } else { &[1, 2] };
        let stabiliser = self.node(
            "ReduceMax",
            &[&exponent],
            vec![attribute_ints("axes", axes), attribute_int("keepdims", 1)],
        );
        let shifted = self.node("Sub", &[&exponent, &stabiliser], vec![]);
        let exp = self.node("Exp", &[&shifted], vec![]);
        let norm = self.scalar(
            &format!("{name}.feature_norm"),
            (m as f64).powf(-0.5) as f32,
        );
        self.node("Mul", &[&exp, &norm], vec![])
    }

    fn transpose(&mut self, x: &str) -> String {
        self.node("Transpose", &[x], vec![attribute_ints("perm", &[0, 2, 1])])
    }

    /// `x + out(attention(x))` for a `[b, c, side, side]` map `x`.
    fn attention(
        &mut self,
        x: &str,
        layer: &str,
        config: &AttentionConfig,
        c: usize,
        side: usize,
    ) -> Result<String> {
        let (kind, d, h, w) = (config.kind, config.key_channels(c), side, side);
        if kind == AttentionKind::Linformer && config.tokens != Some(side * side) {
            return Err(Error::Config(format!(
                "{layer}: linformer attention is built for {} positions, the export's {side}x{side} map has {}: export at the input size the model was built for",
                config.tokens.map_or("an unknown number of".into(), |t| t.to_string()),
                side * side
            )));
        }
        let tokens_shape = self.ints(&format!("{layer}.shape_bcn"), &[0, c as i64, -1]);
        let map_shape = self.ints(
            &format!("{layer}.shape_bchw"),
            &[0, c as i64, h as i64, w as i64],
        );
        let map = self.node("Reshape", &[x, &tokens_shape], vec![]); // [b, c, n]
        let mixed_cn = if kind == AttentionKind::Softmax {
            // Token-major: [b, n, c] @ W^T + b, as the article's nn.Linear.
            let tokens = self.transpose(&map);
            let project = |g: &mut Self, p: &str, input: &str| -> Result<String> {
                let wt = g.derived(&format!("{layer}.{p}.weight"), "t", |t| t.t())?;
                let b = g.weight(&format!("{layer}.{p}.bias"))?;
                let y = g.node("MatMul", &[input, &wt], vec![]);
                Ok(g.node("Add", &[&y, &b], vec![]))
            };
            let q = project(self, "query", &tokens)?;
            let k = project(self, "key", &tokens)?;
            let v = project(self, "value", &tokens)?;
            let kt = self.transpose(&k);
            let scores = self.node("MatMul", &[&q, &kt], vec![]);
            let scale = self.scalar(&format!("{layer}.scale"), (d as f64).powf(-0.5) as f32);
            let scores = self.node("Mul", &[&scores, &scale], vec![]);
            let attn = self.node("Softmax", &[&scores], vec![attribute_int("axis", -1)]);
            let mixed = self.node("MatMul", &[&attn, &v], vec![]);
            let out = project(self, "out", &mixed)?; // [b, n, c]
            let out = self.transpose(&out);
            return Ok({
                let out = self.node("Reshape", &[&out, &map_shape], vec![]);
                self.node("Add", &[x, &out], vec![])
            });
        } else {
            // Channel-first: W @ [b, c, n] + b[:, None].
            let project = |g: &mut Self, p: &str, input: &str| -> Result<String> {
                let wt = g.weight(&format!("{layer}.{p}.weight"))?;
                let b = g.derived(&format!("{layer}.{p}.bias"), "column", |t| t.unsqueeze(1))?;
                let y = g.node("MatMul", &[&wt, input], vec![]);
                Ok(g.node("Add", &[&y, &b], vec![]))
            };
            let q = project(self, "query", &map)?; // [b, d, n]
            let k = project(self, "key", &map)?;
            let v = project(self, "value", &map)?; // [b, c, n]
            let vt = self.transpose(&v);
            let mixed = match kind {
                AttentionKind::Efficient => {
                    let q = self.node("Softmax", &[&q], vec![attribute_int("axis", 1)]);
                    let k = self.node("Softmax", &[&k], vec![attribute_int("axis", 2)]);
                    let context = self.node("MatMul", &[&k, &vt], vec![]); // [b, d, c]
                    let ct = self.transpose(&context);
                    self.node("MatMul", &[&ct, &q], vec![])
                }
                AttentionKind::Linear | AttentionKind::ReluLinear => {
                    let (q, k, eps) = if kind == AttentionKind::Linear {
                        let one = self.scalar(&format!("{layer}.one"), 1.0);
                        let q = self.node("Elu", &[&q], vec![attribute_float("alpha", 1.0)]);
                        let k = self.node("Elu", &[&k], vec![attribute_float("alpha", 1.0)]);
                        let q = self.node("Add", &[&q, &one], vec![]);
                        let k = self.node("Add", &[&k, &one], vec![]);
                        (q, k, la_kernels::linear::ELU_EPS)
                    } else {
                        let q = self.node("Relu", &[&q], vec![]);
                        let k = self.node("Relu", &[&k], vec![]);
                        (q, k, la_kernels::linear::RELU_EPS)
                    };
                    self.kernel_attention(layer, &q, &k, &vt, eps)
                }
                AttentionKind::Performer => {
                    let features = la_attention::performer::features_tensor(
                        config.random_features,
                        d,
                        config.feature_seed,
                        DType::F32,
                        &Device::Cpu,
                    )?;
                    let features = self.constant(format!("{layer}.random_features"), &features)?;
                    let m = config.random_features;
                    let phi_q = self.positive_features(layer, "query", &q, &features, (m, d), true);
                    let phi_k = self.positive_features(layer, "key", &k, &features, (m, d), false);
                    self.kernel_attention(layer, &phi_q, &phi_k, &vt, la_attention::performer::EPS)
                }
                AttentionKind::Linformer => {
                    let e = self.derived(&format!("{layer}.key_tokens.weight"), "t", |t| t.t())?;
                    let f =
                        self.derived(&format!("{layer}.value_tokens.weight"), "t", |t| t.t())?;
                    let keys = self.node("MatMul", &[&k, &e], vec![]); // [b, d, k]
                    let values = self.node("MatMul", &[&v, &f], vec![]); // [b, c, k]
                    let qt = self.transpose(&q);
                    let scores = self.node("MatMul", &[&qt, &keys], vec![]); // [b, n, k]
                    let scale =
                        self.scalar(&format!("{layer}.scale"), (d as f64).powf(-0.5) as f32);
                    let scores = self.node("Mul", &[&scores, &scale], vec![]);
                    let weights = self.node("Softmax", &[&scores], vec![attribute_int("axis", -1)]);
                    let wt = self.transpose(&weights);
                    self.node("MatMul", &[&values, &wt], vec![]) // [b, c, n]
                }
                AttentionKind::Softmax => unreachable!("written token-major above"),
            };
            project(self, "out", &mixed)?
        };
        let out = self.node("Reshape", &[&mixed_cn, &map_shape], vec![]);
        Ok(self.node("Add", &[x, &out], vec![]))
    }
}

/// The ONNX model of `config` with `tensors`, for `size` x `size` inputs, serialised.
pub fn export(
    config: &VggConfig,
    tensors: &HashMap<String, Tensor>,
    size: usize,
) -> Result<Vec<u8>> {
    config.check_tensors(tensors)?;
    let min = 1usize << config.blocks.len();
    if size < min || !size.is_multiple_of(min) {
        return Err(Error::Config(format!(
            "ONNX export at {size}x{size}: the {} max-pools need a multiple of {min}",
            config.blocks.len()
        )));
    }
    let mut g = GraphBuilder {
        tensors,
        nodes: Vec::new(),
        initializers: Vec::new(),
    };
    let (mut x, mut side) = ("input".to_string(), size);
    for layer in config.layers() {
        let name = layer.name.as_str();
        x = match &layer.kind {
            LayerKind::Conv { .. } => {
                let (w, b) = (
                    g.weight(&format!("{name}.weight"))?,
                    g.weight(&format!("{name}.bias"))?,
                );
                let y = g.node(
                    "Conv",
                    &[&x, &w, &b],
                    vec![
                        attribute_ints("kernel_shape", &[3, 3]),
                        attribute_ints("pads", &[1, 1, 1, 1]),
                    ],
                );
                if config.batch_norm {
                    y
                } else {
                    g.node("Relu", &[&y], vec![])
                }
            }
            LayerKind::BatchNorm { .. } => {
                let leaves = ["weight", "bias", "running_mean", "running_var"];
                let mut inputs = vec![x.clone()];
                for leaf in leaves {
                    inputs.push(g.weight(&format!("{name}.{leaf}"))?);
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let y = g.node(
                    "BatchNormalization",
                    &refs,
                    vec![attribute_float("epsilon", BATCH_NORM_EPS)],
                );
                g.node("Relu", &[&y], vec![])
            }
            LayerKind::Attention {
                channels: c,
                config: a,
            } => g.attention(&x, name, a, *c, side)?,
            LayerKind::MaxPool => {
                side /= 2;
                g.node(
                    "MaxPool",
                    &[&x],
                    vec![
                        attribute_ints("kernel_shape", &[2, 2]),
                        attribute_ints("strides", &[2, 2]),
                    ],
                )
            }
            LayerKind::AvgPool { side: p } => {
                let p = *p;
                let pooled = if p == 1 {
                    g.node("GlobalAveragePool", &[&x], vec![])
                } else if side == p {
                    x.clone()
                } else if side == 1 {
                    // An adaptive pool of a 1x1 map repeats it.
                    let shape = g.ints("head.pool.shape", &[1, 1, p as i64, p as i64]);
                    g.node("Expand", &[&x, &shape], vec![])
                } else if side.is_multiple_of(p) {
                    let k = (side / p) as i64;
                    g.node(
                        "AveragePool",
                        &[&x],
                        vec![
                            attribute_ints("kernel_shape", &[k, k]),
                            attribute_ints("strides", &[k, k]),
                        ],
                    )
                } else {
                    return Err(Error::Config(format!(
                        "ONNX export at {size}x{size}: the head's adaptive pool from {side}x{side} to {p}x{p} has no ONNX operator (choose a size whose last map is 1x1 or a multiple of {p})"
                    )));
                };
                g.node("Flatten", &[&pooled], vec![attribute_int("axis", 1)])
            }
            LayerKind::Linear { hidden, .. } => {
                let (w, b) = (
                    g.weight(&format!("{name}.weight"))?,
                    g.weight(&format!("{name}.bias"))?,
                );
                let y = g.node("Gemm", &[&x, &w, &b], vec![attribute_int("transB", 1)]);
                if *hidden {
                    g.node("Relu", &[&y], vec![])
                } else {
                    y
                }
            }
        };
    }
    // The last node's output is the graph's: name it `logits`.
    if let Some(last) = g.nodes.last_mut() {
        last.output = vec!["logits".into()];
    }
    let s = size as i64;
    let model = ModelProto {
        ir_version: IR_VERSION,
        producer_name: "la-vgg".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "{} ({} attention)",
            config.arch_name(),
            config
                .attention_config()
                .map_or("no".into(), |a| a.kind.to_string())
        ),
        graph: Some(GraphProto {
            node: g.nodes,
            name: config.arch_name(),
            initializer: g.initializers,
            input: vec![value_info(
                "input",
                &[None, Some(config.in_channels as i64), Some(s), Some(s)],
            )],
            output: vec![value_info(
                "logits",
                &[None, Some(config.num_classes as i64)],
            )],
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: vec![StringStringEntryProto {
            key: "config".into(),
            value: serde_json::to_string(config).map_err(|e| Error::Config(e.to_string()))?,
        }],
    };
    Ok(model.encode_to_vec())
}
