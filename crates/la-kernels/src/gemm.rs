//! Strided matrix views over slices and the one call into the `gemm` crate (Candle's own
//! matmul kernel) that every CPU kernel's products go through, or, under `--precision bf16`,
//! the bf16 kernel of `bf16.rs`.
//!
//! Why not Candle's matmul: the kernels multiply tiles of buffers they own (im2col columns,
//! attention score tiles, Winograd transforms) inside rayon tasks; a tensor per tile would
//! allocate and copy, and gemm's speed depends on the operands' orientation, which callers
//! choose here.

use candle_core::{DType, WithDType};

use crate::precision::Precision;

pub(crate) mod bf16;

/// A strided view of a matrix in a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view of the same data.
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Strides without dimensions, for [`matmul_scaled`], whose caller gives m, n and k.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

pub(crate) fn view<T>(data: &[T], rs: usize, cs: usize) -> View<'_, T> {
    View { data, rs, cs }
}

/// `dst [m, n] (row-major) = lhs [m, k] x rhs [k, n]`, or `+=` when `accumulate`.
pub(crate) fn matmul<T: WithDType>(
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: gemm::Parallelism,
) {
    let n = rhs.cols;
    matmul_strided(dst, (n, 1), accumulate, T::one(), lhs, rhs, par);
}

/// `dst[m x n] (row-major, row stride n) = (accumulate ? dst : 0) + scale * lhs[m x k] rhs[k x n]`,
/// single-threaded: the callers already run one tile per rayon task.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_scaled<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    scale: T,
    lhs: View<T>,
    rhs: View<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "matmul: destination too small");
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    fn mat<T>(v: View<'_, T>, rows: usize, cols: usize) -> Mat<'_, T> {
        Mat {
            data: v.data,
            rows,
            cols,
            rs: v.rs,
            cs: v.cs,
        }
    }
    matmul_strided(
        dst,
        (n, 1),
        accumulate,
        scale,
        mat(lhs, m, k),
        mat(rhs, k, n),
        gemm::Parallelism::None,
    );
}

/// `scale * lhs x rhs` into a strided destination: element (i, j) of the product goes to
/// `dst[i * rs + j * cs]` for `dst_strides = (rs, cs)`, added to what is there when
/// `accumulate`. gemm's speed depends on the orientation (up to 3.5x at VGG's shapes), so
/// callers choose the fast one.
pub(crate) fn matmul_strided<T: WithDType>(
    dst: &mut [T],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    scale: T,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: gemm::Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    let dst_view = Mat {
        data: &*dst,
        rows: m,
        cols: n,
        rs: dst_rs,
        cs: dst_cs,
    };
    assert!(dst_view.in_bounds(), "matmul: destination size");
    assert!(lhs.in_bounds() && rhs.in_bounds(), "matmul: operand view");
    assert!(
        matches!(T::DTYPE, DType::F32 | DType::F64),
        "matmul: f32/f64 only"
    );
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == DType::F32 && crate::precision::precision() == Precision::Bf16 {
        let threads = match par {
            gemm::Parallelism::None => 1,
            gemm::Parallelism::Rayon(0) => rayon::current_num_threads(),
            gemm::Parallelism::Rayon(n) => n,
        };
        // SAFETY: T is f32 (checked just above), so these are the same slices as f32.
        let (dst, lhs, rhs) = unsafe { (as_f32_mut(dst), as_f32(lhs), as_f32(rhs)) };
        let scale = scale.to_f64() as f32;
        bf16::matmul(dst, (dst_rs, dst_cs), accumulate, scale, lhs, rhs, threads);
        return;
    }
    // SAFETY: gemm reads lhs (i, l) at lhs + i*lhs_rs + l*lhs_cs for i < m, l < k, rhs alike
    // for l < k, j < n, and writes dst (i, j) at dst + i*dst_rs + j*dst_cs; the asserts above
    // keep all of these inside their slices, `dst` is borrowed mutably so it aliases neither
    // operand (distinct (i, j) may share a slot only if the caller's strides overlap), and
    // T is f32 or f64, the types gemm dispatches on (it panics on others). With
    // `read_dst` false gemm overwrites dst (alpha unused): dst = scale*lhs*rhs; with true,
    // dst = dst + scale*lhs*rhs. Strides fit isize since they index live slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// # Safety
/// `T` is f32.
#[cfg(target_arch = "x86_64")]
unsafe fn as_f32<T>(m: Mat<'_, T>) -> Mat<'_, f32> {
    Mat {
        // SAFETY: T is f32 (the caller's promise): same size, alignment and bits.
        data: unsafe { std::slice::from_raw_parts(m.data.as_ptr().cast(), m.data.len()) },
        rows: m.rows,
        cols: m.cols,
        rs: m.rs,
        cs: m.cs,
    }
}

/// # Safety
/// `T` is f32.
#[cfg(target_arch = "x86_64")]
unsafe fn as_f32_mut<T>(data: &mut [T]) -> &mut [f32] {
    // SAFETY: T is f32 (the caller's promise).
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), data.len()) }
}
