//! Reading CPU tensors as plain slices, the float trait the kernels are generic over, and the
//! small loops (lane sums, dot products) that the CPU kernels share.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, WithDType};
use num_traits::Float;

use crate::simd::with_simd;

/// The data of a contiguous CPU storage under `layout`.
pub fn data<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    Ok(&T::cpu_storage_as_slice(storage)?[contiguous_range(layout)?])
}

/// The elements of a contiguous tensor's storage that it covers.
pub fn contiguous_range(layout: &Layout) -> Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
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

/// The float operations the kernels need, for f32 and f64.
pub(crate) trait Real:
    Float + WithDType + Send + Sync + Default + std::ops::AddAssign + std::iter::Sum + 'static
{
    /// `x = exp(x - shift)` over a slice.
    fn exp_shifted(xs: &mut [Self], shift: Self);
}

impl Real for f32 {
    /// A branch-free exp (Cephes' expf: range reduction to [-ln2/2, ln2/2], degree-6
    /// polynomial, exponent bits), about 1 ulp. Every step is a float or integer lane
    /// operation (rounding by adding 1.5 * 2^23, no float-to-int cast), so the loop vectorises
    /// fully, 16 wide under [`with_simd`]; `f32::exp` is a libm call per element.
    fn exp_shifted(xs: &mut [f32], shift: f32) {
        with_simd(|| {
            const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: x + ROUND - ROUND rounds x to an integer
            for x in xs.iter_mut() {
                let v = (*x - shift).clamp(-87.3, 88.3);
                let shifted = v * std::f32::consts::LOG2_E + ROUND;
                let nf = shifted - ROUND;
                let r = v - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
                let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r
                    + 4.166_579_6e-2)
                    * r
                    + 1.666_666_5e-1)
                    * r
                    + 0.5;
                let y = p * r * r + r + 1.0;
                // n sits in the low mantissa bits of `shifted`; 2^n has exponent field n + 127.
                let n = shifted.to_bits().wrapping_sub(ROUND.to_bits());
                *x = y * f32::from_bits(n.wrapping_add(127) << 23);
            }
        })
    }
}

impl Real for f64 {
    fn exp_shifted(xs: &mut [f64], shift: f64) {
        xs.iter_mut().for_each(|x| *x = (*x - shift).exp());
    }
}

/// Dot product with eight independent accumulators so that the compiler vectorises it
/// (a single float accumulator forces a sequential sum).
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let (ra, rb) = (chunks_a.remainder(), chunks_b.remainder());
    for (x, y) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = acc.iter().copied().sum::<T>();
    for (x, y) in ra.iter().zip(rb) {
        sum += *x * *y;
    }
    sum
}

/// Evaluates `$body` with the type `$t` bound to `f32` or `f64` as `$dtype` says, and fails
/// with the op's name for any other dtype: the one step from a tensor's runtime dtype to the
/// kernels' generic code. Inputs of another dtype than the first fail when read as `$t`
/// (`cpu_storage_as_slice`).
macro_rules! with_float {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {{
        // The traits behind `storage.dtype()` and `T::to_cpu_storage_owned`.
        #[allow(unused_imports)]
        use candle_core::{backend::BackendStorage as _, WithDType as _};
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            dt => candle_core::bail!("{}: expected f32 or f64, got {dt:?}", $op),
        }
    }};
}
pub(crate) use with_float;
