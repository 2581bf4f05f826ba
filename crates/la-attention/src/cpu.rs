//! Reading CPU tensors as plain slices, for custom ops' kernels (this crate's and
//! `la-vgg`'s).

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
