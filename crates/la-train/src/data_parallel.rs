//! What makes N ranks train one model: the gradients summed over the ranks in a few large
//! flat buckets (PyTorch DDP's 25 MiB) before each optimiser step, rank 0's weights checked
//! on every rank at the start, and rank 0's BatchNorm running statistics kept on every rank.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::VarMap;

use crate::collective::Collective;
use crate::optim::Param;
use crate::{Error, Result};

/// The gradients of a fixed list of parameters, cut into buckets of about `bucket_bytes`.
#[derive(Clone, Debug)]
pub struct GradBuckets {
    /// Indices into the parameter list, bucket by bucket.
    buckets: Vec<Vec<usize>>,
}

impl GradBuckets {
    /// PyTorch DDP's `bucket_cap_mb` default.
    pub const DEFAULT_BYTES: usize = 25 << 20;

    /// Consecutive parameters share a bucket until it holds `bucket_bytes` of f32; a
    /// larger tensor has a bucket of its own.
    pub fn new(params: &[Param], bucket_bytes: usize) -> Self {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0usize;
        for (i, p) in params.iter().enumerate() {
            let size = p.var.elem_count() * 4;
            match buckets.last_mut() {
                Some(bucket) if bytes + size <= bucket_bytes => {
                    bucket.push(i);
                    bytes += size;
                }
                _ => {
                    buckets.push(vec![i]);
                    bytes = size;
                }
            }
        }
        Self { buckets }
    }

    /// How many all-reduces a step makes.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The parameter indices of each bucket.
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    /// Replaces each parameter's gradient in `grads` by its sum over the ranks. A parameter
    /// without a gradient here adds zeros, and keeps having none.
    pub fn all_reduce(
        &self,
        c: &dyn Collective,
        params: &[Param],
        grads: &mut GradStore,
    ) -> Result<()> {
        for bucket in &self.buckets {
            let mut flat = Vec::with_capacity(bucket.len());
            for &i in bucket {
                let var = params[i].var.as_tensor();
                let piece = match grads.get(var) {
                    Some(g) => g.detach().flatten_all()?.to_dtype(DType::F32)?,
                    None => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
                };
                flat.push(piece);
            }
            let summed = c.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            let mut offset = 0;
            for &i in bucket {
                let var = params[i].var.as_tensor();
                let n = var.elem_count();
                if grads.get(var).is_some() {
                    let g = summed
                        .narrow(0, offset, n)?
                        .reshape(var.shape())?
                        .to_dtype(var.dtype())?;
                    grads.insert(var, g);
                }
                offset += n;
            }
        }
        Ok(())
    }
}

/// Rank 0's tensors of `varmap` sent to every rank and compared with its own, bit for bit:
/// every rank must start from the same model (same seed, same weights file, same
/// checkpoint), and a mistake would otherwise train N different models unseen. The error
/// names the first tensor that differs.
pub fn check_same_weights(c: &dyn Collective, varmap: &VarMap) -> Result<()> {
    if c.size() == 1 {
        return Ok(());
    }
    let tensors = sorted_tensors(varmap);
    // The names first: a rank with another architecture has other tensors.
    let names = tensors
        .iter()
        .map(|(n, t)| format!("{n}{:?}", t.dims()))
        .collect::<Vec<_>>()
        .join(",");
    let mut theirs = names.clone().into_bytes();
    c.broadcast_bytes(&mut theirs, 0)?;
    let differs = if theirs != names.as_bytes() {
        Some("its tensors (names or shapes) differ from rank 0's".to_string())
    } else {
        let mut first = None;
        for (name, t) in &tensors {
            let mine = t.flatten_all()?.to_dtype(DType::F32)?;
            let rank0 = c.broadcast(&mine, 0)?;
            let same = mine
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .eq(rank0.to_vec1::<f32>()?.iter().map(|v| v.to_bits()));
            if !same && first.is_none() {
                first = Some(format!("`{name}` differs from rank 0's"));
            }
        }
        first
    };
    let local = match differs {
        None => Ok(((), Vec::new())),
        Some(what) => Err(Error::Collective(format!(
            "rank {}: {what}; every rank must build the same model (the same seed, weights file or checkpoint)",
            c.rank()
        ))),
    };
    crate::collective::agree(c, local, 0).map(|_| ())
}

/// Rank 0's BatchNorm running statistics on every rank, as PyTorch DDP's
/// `broadcast_buffers`: each rank updates them from its own shard, and the model every
/// rank evaluates (and rank 0 saves) is rank 0's.
pub fn broadcast_running_stats(c: &dyn Collective, varmap: &VarMap) -> Result<()> {
    if c.size() == 1 {
        return Ok(());
    }
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().filter(|n| n.contains("running_")).collect();
    names.sort();
    if names.is_empty() {
        return Ok(());
    }
    let flat: Vec<Tensor> = names
        .iter()
        .map(|n| data[*n].as_tensor().flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let rank0 = c.broadcast(&Tensor::cat(&flat, 0)?, 0)?;
    let mut offset = 0;
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        var.set(&rank0.narrow(0, offset, n)?.reshape(var.shape())?)?;
        offset += n;
    }
    Ok(())
}

fn sorted_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}
