//! Adaptive average pooling (PyTorch's `AdaptiveAvgPool2d`), which Candle lacks.

use candle_core::Tensor;

/// Pools [b, c, h, w] to [b, c, out, out] with PyTorch's bins: output cell i averages rows
/// floor(i h / out) .. ceil((i + 1) h / out). A 1x1 map is copied to every cell (what
/// torchvision's VGG does at 32x32), an exact multiple is a plain average pool.
pub fn adaptive_avg_pool2d(x: &Tensor, out: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h == out && w == out {
        return Ok(x.clone());
    }
    if h.is_multiple_of(out) && w.is_multiple_of(out) {
        return x.avg_pool2d((h / out, w / out));
    }
    if h == 1 && w == 1 {
        return x.broadcast_as((b, c, out, out))?.contiguous();
    }
    let bins = |size: usize| -> Vec<(usize, usize)> {
        (0..out)
            .map(|i| (i * size / out, ((i + 1) * size).div_ceil(out)))
            .collect()
    };
    let mut rows = Vec::with_capacity(out);
    for (y0, y1) in bins(h) {
        let band = x.narrow(2, y0, y1 - y0)?;
        let cells = bins(w)
            .into_iter()
            .map(|(x0, x1)| {
                band.narrow(3, x0, x1 - x0)?
                    .mean_keepdim(2)?
                    .mean_keepdim(3)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        rows.push(Tensor::cat(&cells, 3)?);
    }
    Tensor::cat(&rows, 2)
}

/// 2x2 max-pooling with stride 2 (odd trailing rows/columns dropped, as PyTorch's floor mode).
///
/// Candle 0.11's `max_pool2d` gradient is wrong: it multiplies the upstream gradient by the
/// fraction of window elements equal to the maximum (1/4 for a unique maximum) instead of
/// routing it to the maximum, so each pool of a VGG shrank the gradient about fourfold. This
/// op gives the whole gradient to the first maximum of each window in row-major order, as
/// PyTorch does. On devices other than the CPU it falls back to Candle's op.
pub fn max_pool_2x2(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu()
        || !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
    {
        return x.max_pool2d(2);
    }
    x.contiguous()?.apply_op1(MaxPool2x2)
}

struct MaxPool2x2;

/// For each output cell, the flat input index of its window's first maximum.
fn argmax_2x2<T: candle_core::WithDType + PartialOrd>(
    x: &[T],
    planes: usize,
    h: usize,
    w: usize,
) -> Vec<usize> {
    let (oh, ow) = (h / 2, w / 2);
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let base = p * h * w;
        for i in 0..oh {
            for j in 0..ow {
                let top = base + 2 * i * w + 2 * j;
                let mut best = top;
                for idx in [top + 1, top + w, top + w + 1] {
                    // `>` keeps the first maximum; a NaN propagates as in PyTorch.
                    if x[idx] > x[best] || x[idx].partial_cmp(&x[idx]).is_none() {
                        best = idx;
                    }
                }
                out.push(best);
            }
        }
    }
    out
}

impl candle_core::CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("max-pool-2x2 needs a contiguous input")
        };
        let shape = candle_core::Shape::from((b, c, h / 2, w / 2));
        let storage = match storage {
            candle_core::CpuStorage::F32(v) => {
                let x = &v[start..end];
                candle_core::CpuStorage::F32(
                    argmax_2x2(x, b * c, h, w)
                        .into_iter()
                        .map(|i| x[i])
                        .collect(),
                )
            }
            candle_core::CpuStorage::F64(v) => {
                let x = &v[start..end];
                candle_core::CpuStorage::F64(
                    argmax_2x2(x, b * c, h, w)
                        .into_iter()
                        .map(|i| x[i])
                        .collect(),
                )
            }
            _ => candle_core::bail!("max-pool-2x2: unsupported dtype"),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let grad = match arg.dtype() {
            candle_core::DType::F32 => {
                let x: Vec<f32> = arg.flatten_all()?.to_vec1()?;
                let g: Vec<f32> = grad_res
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut out = vec![0f32; x.len()];
                for (k, idx) in argmax_2x2(&x, b * c, h, w).into_iter().enumerate() {
                    out[idx] += g[k];
                }
                Tensor::from_vec(out, (b, c, h, w), arg.device())?
            }
            _ => {
                let x: Vec<f64> = arg
                    .to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()?;
                let g: Vec<f64> = grad_res
                    .to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut out = vec![0f64; x.len()];
                for (k, idx) in argmax_2x2(&x, b * c, h, w).into_iter().enumerate() {
                    out[idx] += g[k];
                }
                Tensor::from_vec(out, (b, c, h, w), arg.device())?.to_dtype(arg.dtype())?
            }
        };
        Ok(Some(grad))
    }
}
