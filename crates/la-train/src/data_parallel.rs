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
    /// One bucket's values in host memory, kept from step to step (a fresh buffer of the
    /// size of VGG16's first linear layer, 411 MB, would be paged in again every step).
    staging: Vec<f32>,
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
        Self {
            buckets,
            staging: Vec::new(),
        }
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
    /// without a gradient here adds zeros, and keeps having none. A collective that sums
    /// tensors on the gradients' device gets each bucket as one tensor there; otherwise the
    /// bucket is staged in host memory, CPU gradients copied straight from their storage.
    pub fn all_reduce(
        &mut self,
        c: &dyn Collective,
        params: &[Param],
        grads: &mut GradStore,
    ) -> Result<()> {
        for bucket in &self.buckets {
            let device = params[bucket[0]].var.device();
            if c.reduces_tensors_on(device) {
                Self::all_reduce_tensors(c, bucket, params, grads)?;
                continue;
            }
            let total: usize = bucket.iter().map(|&i| params[i].var.elem_count()).sum();
            self.staging.resize(total, 0.0);
            let mut offset = 0;
            for &i in bucket {
                let var = params[i].var.as_tensor();
                let n = var.elem_count();
                let slot = &mut self.staging[offset..offset + n];
                match grads.get(var) {
                    Some(g) => copy_to_host(g, slot)?,
                    None => slot.fill(0.0),
                }
                offset += n;
            }
            c.all_reduce_sum_f32(&mut self.staging[..total])?;
            let mut offset = 0;
            for &i in bucket {
                let var = params[i].var.as_tensor();
                let n = var.elem_count();
                if grads.get(var).is_some() {
                    let summed = &self.staging[offset..offset + n];
                    let g = Tensor::from_slice(summed, var.shape(), var.device())?
                        .to_dtype(var.dtype())?;
                    grads.insert(var, g);
                }
                offset += n;
            }
        }
        Ok(())
    }
}

impl GradBuckets {
    /// One bucket as one flat tensor on the gradients' device, summed by the collective
    /// itself (NCCL on a GPU): no host copy.
    fn all_reduce_tensors(
        c: &dyn Collective,
        bucket: &[usize],
        params: &[Param],
        grads: &mut GradStore,
    ) -> Result<()> {
        let mut flat = Vec::with_capacity(bucket.len());
        for &i in bucket {
            let var = params[i].var.as_tensor();
            flat.push(match grads.get(var) {
                Some(g) => g.detach().flatten_all()?.to_dtype(DType::F32)?,
                None => Tensor::zeros(var.elem_count(), DType::F32, var.device())?,
            });
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
        Ok(())
    }
}

/// `t`'s values as f32 into `out` (of its element count): a slice copy for a contiguous f32
/// tensor on the CPU, through a converted copy otherwise.
fn copy_to_host(t: &Tensor, out: &mut [f32]) -> Result<()> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            out.copy_from_slice(&data[a..b]);
            return Ok(());
        }
    }
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    out.copy_from_slice(&values);
    Ok(())
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

/// One SGD step of a small VGG_bn on `device` with its gradients summed through `c`, a
/// collective of one rank, against the same step without it: the largest difference of
/// the parameters after the two steps. A sum over one rank changes nothing, so anything but
/// zero is a fault of the collective or the buckets (`la-cli selftest` runs it on NCCL).
pub fn one_rank_step_difference(c: &dyn Collective, device: &candle_core::Device) -> Result<f64> {
    use candle_core::ModuleT;
    if c.size() != 1 {
        return Err(Error::Collective(format!(
            "the one-rank check needs a collective of one rank, not {}",
            c.size()
        )));
    }
    let config = la_vgg::VggConfig::vgg(11, 10)?
        .with_batch_norm(true)
        .with_head(la_vgg::HeadConfig::cifar(None))
        .with_width(0.125)?;
    let images = la_kernels::parity::uniform(&[4, 3, 32, 32], -1.0, 1.0, 7)?
        .to_dtype(DType::F32)?
        .to_device(device)?;
    let labels = [1, 4, 7, 9];
    let step = |through: Option<&dyn Collective>| -> Result<Vec<(String, Tensor)>> {
        let (model, varmap) =
            la_vgg::trainable(config.clone(), Default::default(), 0, DType::F32, device)?;
        let logits = model.forward_t(&images, true)?;
        let mut grads = crate::loss::cross_entropy(&logits, &labels, 0.0)?.backward()?;
        let params = crate::optim::param_groups(&varmap, &crate::optim::GroupRules::default());
        if let Some(c) = through {
            GradBuckets::new(&params, GradBuckets::DEFAULT_BYTES)
                .all_reduce(c, &params, &mut grads)?;
        }
        crate::Optimizer::new(crate::OptimizerConfig::sgd(), params).step(&grads, 0.1)?;
        Ok(sorted_tensors(&varmap))
    };
    let (plain, reduced) = (step(None)?, step(Some(c))?);
    let mut worst = 0.0f64;
    for ((_, a), (_, b)) in plain.iter().zip(&reduced) {
        let diff = (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?;
        worst = worst.max(diff.to_scalar::<f64>()?);
    }
    Ok(worst)
}
