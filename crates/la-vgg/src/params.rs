//! Trainable parameters with reproducible initialisation.
//!
//! Candle's CPU random generator cannot be seeded (`Device::set_seed` fails on the CPU), so a
//! plain `VarMap` initialises differently on every run. [`SeededVarMap`] is a VarBuilder
//! backend that draws each new variable from a generator seeded by (seed, variable name), and
//! turns tensors given up front (pretrained weights) into trainable variables instead.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::config::VggConfig;
use crate::{Result, Vgg};

/// Values of `init` for `shape`, from a generator seeded by `seed` and `name`.
pub fn seeded_init(
    init: Init,
    shape: &Shape,
    seed: u64,
    name: &str,
) -> candle_core::Result<Tensor> {
    let count = shape.elem_count();
    let mut rng = la_core::rng::labelled(seed, name);
    let normal = |rng: &mut la_core::rng::ChaCha12Rng,
                  mean: f64,
                  std: f64|
     -> candle_core::Result<Vec<f32>> {
        let dist =
            Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        Ok((0..count).map(|_| dist.sample(rng) as f32).collect())
    };
    let values: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; count],
        Init::Uniform { lo, up } => (0..count)
            .map(|_| rng.random_range(lo..up) as f32)
            .collect(),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev)?,
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std)?,
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..count)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                }
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), &Device::Cpu)
}

/// A `VarMap` whose new variables are seeded, or taken from `initial` when it has them.
pub struct SeededVarMap {
    pub varmap: VarMap,
    seed: u64,
    initial: HashMap<String, Tensor>,
}

impl SeededVarMap {
    pub fn new(seed: u64, initial: HashMap<String, Tensor>) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
            initial,
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if self
            .varmap
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
        {
            return self.varmap.get(s, name, h, dtype, dev);
        }
        let value = match self.initial.get(name) {
            Some(t) if t.shape() != &s => {
                candle_core::bail!(
                    "tensor `{name}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    s.dims()
                )
            }
            Some(t) => t.clone(),
            None => seeded_init(h, &s, self.seed, name)?,
        };
        let var = Var::from_tensor(&value.to_dtype(dtype)?.to_device(dev)?)?;
        let tensor = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}`: a trainable model needs the variable's shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.initial.contains_key(name)
            || self
                .varmap
                .data()
                .lock()
                .expect("varmap lock")
                .contains_key(name)
    }
}

/// A model whose every tensor is a trainable variable in the returned `VarMap`: taken from
/// `initial` where it has the name (pretrained weights, a checkpoint), seeded otherwise.
/// Tensors of `initial` that the model does not use are an error, so a file for another
/// architecture is not half-loaded silently.
pub fn trainable(
    config: VggConfig,
    initial: HashMap<String, Tensor>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(Vgg, VarMap)> {
    config.check_tensors_subset(&initial)?;
    let backend = SeededVarMap::new(seed, initial);
    let varmap = backend.varmap.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = Vgg::new(config, vb)?;
    Ok((model, varmap))
}
