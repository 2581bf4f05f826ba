//! Reading CPU tensors as plain slices, and small kernels shared by the custom ops (this
//! crate's and `la-vgg`'s).

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, WithDType};

/// The data of a contiguous CPU storage under `layout`.
pub fn data<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => candle_core::bail!("expected a contiguous tensor"),
    }
}

/// Runs `f` on the data of contiguous CPU tensors, read in place (their storages locked for
/// reading meanwhile): how a custom op's backward gets at its inputs without copying them.
pub fn with_slices<T: WithDType, R, const N: usize>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[T]; N]) -> Result<R>,
) -> Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(data::<T>(s, layout)?),
            _ => candle_core::bail!("expected CPU tensors"),
        }
    }
    let slices: [&[T]; N] = match slices.try_into() {
        Ok(slices) => slices,
        Err(_) => unreachable!("one slice per tensor"),
    };
    f(slices)
}

/// The sum of a slice in 16 independent lanes, which the compiler vectorises (a single running
/// total is one dependent add per element). The tail is summed first, then the lanes in order.
#[inline]
pub fn sum_lanes<T: num_traits::Num + Copy>(xs: &[T]) -> T {
    let mut lanes = [T::zero(); 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &x)| *l = *l + x);
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &x| a + x);
    lanes.iter().fold(tail, |a, &x| a + x)
}
