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
