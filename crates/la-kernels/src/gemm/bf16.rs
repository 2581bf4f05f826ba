//! Products with bf16 operands and f32 sums: what every product of the CPU kernels runs
//! under `--precision bf16` (see the `precision` module).
//!
//! Why by hand: the `gemm` crate has no bf16 kernel and Candle's bf16 matmul on the CPU
//! works in f32. AVX512_BF16's `vdpbf16ps` multiplies 16 pairs of bf16 and adds them to 16
//! f32 sums in one instruction, twice the multiply-adds of an f32 FMA.
//!
//! GotoBLAS's layout: k is cut in blocks of [`KC`]; each block of either operand is rounded
//! to bf16 (to nearest even, subnormals to zero, as the instruction's own conversion does)
//! and packed in panels where one u32 holds two consecutive k of a row of `lhs` or a column
//! of `rhs`, so that one microkernel step reads a pair of k of each. The 12 x 32 microkernel
//! keeps its sums in 24 of the 32 vector registers. [`matmul_plain`] is the same product
//! written plainly (operands rounded to bf16, sums in f64), for the tests.

use super::Mat;

/// Rows of `lhs` per microkernel: 12 x 2 accumulators, 2 `rhs` vectors and a broadcast
/// (14, 16 x 16, 6 x 64 and 8 x 48 ran within 3 % of it at the Winograd shapes, 12 the best).
const MR: usize = 12;
/// Columns of `rhs` per microkernel: two vectors of 16 f32.
const NR: usize = 32;
/// Vectors of 16 f32 across a microkernel's columns.
const NV: usize = NR / 16;
/// k per block: a `rhs` micro-panel, KC / 2 x NR u32 = 16 KiB, stays in L1.
const KC: usize = 256;
/// Rows of `lhs` per block: MC x KC bf16 = 144 KiB, in L2.
const MC: usize = MR * 24;
/// Columns of `rhs` per block: KC x NC bf16 = 1 MiB.
const NC: usize = NR * 64;

/// Whether this CPU has the instructions the kernel needs.
pub(crate) fn available() -> bool {
    crate::precision::bf16_supported()
}

/// `x` rounded to bf16, as its 16 bits: to nearest even, NaN kept quiet, subnormal inputs
/// to zero (`vcvtne2ps2bf16`'s rounding, so scalar and vector packing agree).
#[cfg(test)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if bits & 0x7f80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// `x` rounded to bf16 and back.
#[cfg(test)]
fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// The product plainly: `dst (i, j) = (accumulate ? dst : 0) + scale * sum_l a(i, l) b(l, j)`
/// with `a` and `b` rounded to bf16 and the sum in f64. What [`matmul`] computes, up to the
/// order of its f32 sums.
#[cfg(test)]
fn matmul_plain(
    dst: &mut [f32],
    (rs, cs): (usize, usize),
    accumulate: bool,
    scale: f32,
    lhs: Mat<f32>,
    rhs: Mat<f32>,
) {
    for i in 0..lhs.rows {
        for j in 0..rhs.cols {
            let sum: f64 = (0..lhs.cols)
                .map(|l| {
                    let a = round_to_bf16(lhs.data[i * lhs.rs + l * lhs.cs]);
                    let b = round_to_bf16(rhs.data[l * rhs.rs + j * rhs.cs]);
                    a as f64 * b as f64
                })
                .sum();
            let d = &mut dst[i * rs + j * cs];
            let product = scale * sum as f32;
            *d = if accumulate { *d + product } else { product };
        }
    }
}

/// `dst (i, j) at dst[i * rs + j * cs] = (accumulate ? dst : 0) + scale * lhs x rhs` with
/// bf16 operands, split over `threads` when more than one. The caller has checked that every
/// view lies inside its slice and that [`available`] holds.
#[cfg(target_arch = "x86_64")]
pub(crate) fn matmul(
    dst: &mut [f32],
    (rs, cs): (usize, usize),
    accumulate: bool,
    scale: f32,
    lhs: Mat<f32>,
    rhs: Mat<f32>,
    threads: usize,
) {
    assert!(available(), "bf16 products need AVX512_BF16");
    let (m, n) = (lhs.rows, rhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    let out = Out {
        ptr: dst.as_mut_ptr(),
        rs,
        cs,
    };
    // Split the longer side in whole microkernel panels, one part per thread.
    let (panels, panel) = if n.div_ceil(NR) >= m.div_ceil(MR) {
        (n.div_ceil(NR), NR)
    } else {
        (m.div_ceil(MR), MR)
    };
    let parts = threads.clamp(1, panels);
    if parts == 1 {
        // SAFETY: the caller checked the views; `available` holds (asserted above).
        unsafe { kernel::serial(out, accumulate, scale, lhs, rhs) };
        return;
    }
    let per_part = panels.div_ceil(parts) * panel;
    let split_columns = panel == NR;
    let total = if split_columns { n } else { m };
    rayon::scope(move |s| {
        for start in (0..total).step_by(per_part) {
            let len = per_part.min(total - start);
            let (out, lhs, rhs) = if split_columns {
                (out.offset(0, start), lhs, rhs.columns(start, len))
            } else {
                (out.offset(start, 0), lhs.rows_from(start, len), rhs)
            };
            // SAFETY: each part writes the elements of its own rows or columns only, so the
            // parts never write (or read) one element twice; the views stay inside their
            // slices, which outlive the scope.
            s.spawn(move |_| unsafe { kernel::serial(out, accumulate, scale, lhs, rhs) });
        }
    });
}

/// The destination as a raw pointer, so that parts of one product can write their own
/// elements from several threads.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}

// SAFETY: `matmul` hands each thread an `Out` whose elements no other thread touches.
unsafe impl Send for Out {}

impl Out {
    fn offset(self, row: usize, col: usize) -> Self {
        Self {
            // SAFETY: (row, col) is an element of the destination the caller checked.
            ptr: unsafe { self.ptr.add(row * self.rs + col * self.cs) },
            ..self
        }
    }
}

impl<'a> Mat<'a, f32> {
    fn rows_from(self, start: usize, len: usize) -> Self {
        Self {
            data: &self.data[start * self.rs..],
            rows: len,
            ..self
        }
    }

    fn columns(self, start: usize, len: usize) -> Self {
        Self {
            data: &self.data[start * self.cs..],
            cols: len,
            ..self
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::{Mat, Out, KC, MC, MR, NC, NR, NV};

    thread_local! {
        /// The packed blocks of `lhs` and `rhs`, kept between calls: the Winograd products
        /// call in once per tile batch.
        static PACKED: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// The whole product on this thread.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW and AVX512_BF16; `out` addresses an m x n destination
    /// that no other thread touches during the call.
    pub(super) unsafe fn serial(
        out: Out,
        accumulate: bool,
        scale: f32,
        lhs: Mat<f32>,
        rhs: Mat<f32>,
    ) {
        PACKED.with(|packed| {
            let (a_block, b_block) = &mut *packed.borrow_mut();
            // SAFETY: forwarded from the caller.
            unsafe { serial_in(out, accumulate, scale, lhs, rhs, a_block, b_block) }
        })
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn serial_in(
        out: Out,
        accumulate: bool,
        scale: f32,
        lhs: Mat<f32>,
        rhs: Mat<f32>,
        a_block: &mut Vec<u32>,
        b_block: &mut Vec<u32>,
    ) {
        let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
        if k == 0 {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside the destination.
                    let d = unsafe { &mut *out.ptr.add(i * out.rs + j * out.cs) };
                    *d = if accumulate { *d } else { 0.0 };
                }
            }
            return;
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let pairs = kc.div_ceil(2);
                // rhs (l, j) as lane j of pair l: lanes along its columns.
                let b = Operand {
                    data: &rhs.data[pc * rhs.rs + jc * rhs.cs..],
                    lane_stride: rhs.cs,
                    k_stride: rhs.rs,
                    lanes: nc,
                    k: kc,
                };
                pack::<NR>(b, b_block);
                let beta = if pc == 0 { accumulate } else { true };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let a = Operand {
                        data: &lhs.data[ic * lhs.rs + pc * lhs.cs..],
                        lane_stride: lhs.rs,
                        k_stride: lhs.cs,
                        lanes: mc,
                        k: kc,
                    };
                    pack::<MR>(a, a_block);
                    for jr in (0..nc).step_by(NR) {
                        let b_panel = &b_block[jr / NR * pairs * NR..][..pairs * NR];
                        for ir in (0..mc).step_by(MR) {
                            let a_panel = &a_block[ir / MR * pairs * MR..][..pairs * MR];
                            let tile = out.offset(ic + ir, jc + jr);
                            let valid = (MR.min(mc - ir), NR.min(nc - jr));
                            // SAFETY: the panels hold `pairs` pairs each; the tile's valid
                            // part is inside the destination.
                            unsafe { micro(pairs, a_panel, b_panel, tile, valid, beta, scale) };
                        }
                    }
                }
            }
        }
    }

    /// A block of an operand: element (lane, l) at `data[lane * lane_stride + l * k_stride]`
    /// for lane < lanes, l < k.
    struct Operand<'a> {
        data: &'a [f32],
        lane_stride: usize,
        k_stride: usize,
        lanes: usize,
        k: usize,
    }

    /// Packs `src` into panels of `W` lanes: panel `p`'s pair `q`, lane `t` is the u32 at
    /// `[(p * pairs + q) * W + t]` holding (lane p W + t, k 2q) in its low half and k 2q + 1
    /// in its high half; lanes past the end and the odd k past the end are zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack<const W: usize>(src: Operand, dst: &mut Vec<u32>) {
        let pairs = src.k.div_ceil(2);
        let panels = src.lanes.div_ceil(W);
        // Every element is written below except the lanes past the end, all in the last
        // panel: zeroing only that one spares a pass over the block.
        dst.resize(panels * pairs * W, 0);
        if !src.lanes.is_multiple_of(W) {
            dst[(panels - 1) * pairs * W..].fill(0);
        }
        if src.lane_stride == 1 {
            pack_along_lanes::<W>(&src, pairs, dst);
        } else if src.k_stride == 1 {
            pack_transposing::<W>(&src, pairs, dst);
        } else {
            pack_along_k::<W>(&src, pairs, dst);
        }
    }

    /// Lanes adjacent in memory: two rows of 16 lanes at a time, rounded and interleaved.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_along_lanes<const W: usize>(src: &Operand, pairs: usize, dst: &mut [u32]) {
        // Lane t of the even k next to lane t of the odd one.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for (p, panel) in dst.chunks_exact_mut(pairs * W).enumerate() {
            for chunk in (0..W).step_by(16) {
                let first = p * W + chunk;
                let lanes = 16.min(W - chunk).min(src.lanes.saturating_sub(first));
                if lanes == 0 {
                    continue;
                }
                let mask: __mmask16 = if lanes == 16 { !0 } else { (1 << lanes) - 1 };
                for q in 0..pairs {
                    let rounded = _mm512_cvtne2ps_pbh(
                        load_lanes(src, first, 2 * q + 1, mask),
                        load_lanes(src, first, 2 * q, mask),
                    );
                    let pairs_u32 = _mm512_permutexvar_epi16(interleave, m512i(rounded));
                    let at = &mut panel[q * W + chunk..][..lanes];
                    // SAFETY: `at` holds `lanes` u32 and the mask stores that many.
                    unsafe {
                        _mm512_mask_storeu_epi32(at.as_mut_ptr().cast(), mask, pairs_u32);
                    }
                }
            }
        }
    }

    /// k adjacent in memory: 32 k of each of 16 lanes are loaded and rounded (each lane's 16
    /// pairs in one vector, in pair order), and the 16 x 16 block of pairs is transposed in
    /// registers so that each pair's 16 lanes are stored at once. (Gathering each pair's lanes
    /// took a sixth of the products' time at the Winograd shapes.)
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_transposing<const W: usize>(src: &Operand, pairs: usize, dst: &mut [u32]) {
        for (p, panel) in dst.chunks_exact_mut(pairs * W).enumerate() {
            let lanes = W.min(src.lanes - p * W);
            for chunk in (0..lanes).step_by(16) {
                let n = 16.min(lanes - chunk);
                let store_mask: __mmask16 = ((1u32 << n) - 1) as u16;
                for l0 in (0..src.k).step_by(32) {
                    let count = 32.min(src.k - l0);
                    let lo_mask: __mmask16 = ((1u64 << count.min(16)) - 1) as u16;
                    let hi_mask: __mmask16 = ((1u64 << count.saturating_sub(16)) - 1) as u16;
                    let mut rows = [_mm512_setzero_si512(); 16];
                    for (t, row) in rows.iter_mut().enumerate().take(n) {
                        let at = &src.data[(p * W + chunk + t) * src.lane_stride + l0..];
                        // SAFETY: the masked k l0..l0 + count of this lane are in the block.
                        let (lo, hi) = unsafe {
                            (
                                _mm512_maskz_loadu_ps(lo_mask, at.as_ptr()),
                                _mm512_maskz_loadu_ps(hi_mask, at.as_ptr().wrapping_add(16)),
                            )
                        };
                        *row = m512i(_mm512_cvtne2ps_pbh(hi, lo));
                    }
                    let columns = transpose16(rows);
                    for (q, column) in columns.iter().enumerate().take(count.div_ceil(2)) {
                        let at = &mut panel[(l0 / 2 + q) * W + chunk..][..n];
                        // SAFETY: `at` holds n u32 and the mask stores n.
                        unsafe {
                            _mm512_mask_storeu_epi32(at.as_mut_ptr().cast(), store_mask, *column)
                        };
                    }
                }
            }
        }
    }

    /// The transpose of a 16 x 16 block of u32: element t of the result's vector q is element
    /// q of `rows[t]`.
    #[target_feature(enable = "avx512f")]
    fn transpose16(rows: [__m512i; 16]) -> [__m512i; 16] {
        // Within each 128-bit lane L, after two rounds of unpacking, vector 4 i + j holds
        // column 4 L + j of rows 4 i .. 4 i + 3.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
        }
        let mut s = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            s[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Then a 4 x 4 transpose of 128-bit lanes for each j.
        let mut out = [_mm512_setzero_si512(); 16];
        for j in 0..4 {
            let x0 = _mm512_shuffle_i32x4::<0x44>(s[j], s[4 + j]);
            let x1 = _mm512_shuffle_i32x4::<0xEE>(s[j], s[4 + j]);
            let y0 = _mm512_shuffle_i32x4::<0x44>(s[8 + j], s[12 + j]);
            let y1 = _mm512_shuffle_i32x4::<0xEE>(s[8 + j], s[12 + j]);
            out[j] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
            out[4 + j] = _mm512_shuffle_i32x4::<0xDD>(x0, y0);
            out[8 + j] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
            out[12 + j] = _mm512_shuffle_i32x4::<0xDD>(x1, y1);
        }
        out
    }

    /// Lanes `first..` (as many as `mask` has) of k `l`, zero past the block's k.
    #[target_feature(enable = "avx512f")]
    fn load_lanes(src: &Operand, first: usize, l: usize, mask: __mmask16) -> __m512 {
        if l >= src.k {
            return _mm512_setzero_ps();
        }
        let at = &src.data[first + l * src.k_stride..];
        // SAFETY: the masked lanes of k l are elements of the block, inside `src.data`.
        unsafe { _mm512_maskz_loadu_ps(mask, at.as_ptr()) }
    }

    /// k adjacent in memory (or neither): 32 k of one lane at a time, rounded in place (pair
    /// order comes out of the conversion), stored one u32 a pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_along_k<const W: usize>(src: &Operand, pairs: usize, dst: &mut [u32]) {
        for lane in 0..src.lanes {
            let (panel, t) = (lane / W, lane % W);
            let panel = &mut dst[panel * pairs * W..][..pairs * W];
            let base = &src.data[lane * src.lane_stride..];
            for l0 in (0..src.k).step_by(32) {
                let count = 32.min(src.k - l0);
                let mut values = [0f32; 32];
                if src.k_stride == 1 {
                    values[..count].copy_from_slice(&base[l0..l0 + count]);
                } else {
                    for (i, v) in values[..count].iter_mut().enumerate() {
                        *v = base[(l0 + i) * src.k_stride];
                    }
                }
                // SAFETY: `values` holds 32 f32.
                let (lo, hi) = unsafe {
                    (
                        _mm512_loadu_ps(values.as_ptr()),
                        _mm512_loadu_ps(values.as_ptr().add(16)),
                    )
                };
                let mut rounded = [0u32; 16];
                // SAFETY: `rounded` holds 16 u32.
                unsafe {
                    _mm512_storeu_si512(
                        rounded.as_mut_ptr().cast(),
                        m512i(_mm512_cvtne2ps_pbh(hi, lo)),
                    )
                };
                for (q, &pair) in rounded[..count.div_ceil(2)].iter().enumerate() {
                    panel[(l0 / 2 + q) * W + t] = pair;
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    fn m512i(x: __m512bh) -> __m512i {
        // SAFETY: both are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(x) }
    }

    #[target_feature(enable = "avx512f")]
    fn m512bh(x: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    }

    /// The MR x NR sums of one tile over `pairs` pairs of k, in registers: a counted loop
    /// over raw pointers, which LLVM keeps out of memory (iterating over slices made it store
    /// all its sums back to the stack every step, at half the speed).
    ///
    /// # Safety
    /// `a` points to `pairs * MR` u32, `b` to `pairs * NR`.
    #[inline(always)]
    unsafe fn sums(pairs: usize, a: *const u32, b: *const u32) -> [[__m512; NV]; MR] {
        let mut sums = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..pairs {
            // SAFETY: pair p of both panels is in bounds (the caller's promise).
            unsafe {
                let mut bv = [m512bh(_mm512_setzero_si512()); NV];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = m512bh(_mm512_loadu_si512(b.add(p * NR + 16 * v).cast()));
                }
                let a = a.add(p * MR);
                for (i, sum) in sums.iter_mut().enumerate() {
                    let a = m512bh(_mm512_set1_epi32(*a.add(i) as i32));
                    for (sum, &bv) in sum.iter_mut().zip(&bv) {
                        *sum = _mm512_dpbf16_ps(*sum, a, bv);
                    }
                }
            }
        }
        sums
    }

    /// One MR x NR tile: the sums over `pairs` pairs of k, then `dst = (beta ? dst : 0) +
    /// scale * sums` for the `valid` rows and columns.
    ///
    /// # Safety
    /// `a` holds `pairs * MR` u32, `b` `pairs * NR`; the valid part of `out` is writable.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn micro(
        pairs: usize,
        a: &[u32],
        b: &[u32],
        out: Out,
        (rows, cols): (usize, usize),
        beta: bool,
        scale: f32,
    ) {
        assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
        // SAFETY: the panels hold `pairs` pairs (asserted).
        let sums = unsafe { sums(pairs, a.as_ptr(), b.as_ptr()) };
        let scale_v = _mm512_set1_ps(scale);
        if out.cs == 1 {
            for (i, sum) in sums.iter().enumerate().take(rows) {
                for (half, &s) in sum.iter().enumerate() {
                    let first = half * 16;
                    if first >= cols {
                        break;
                    }
                    let n = 16.min(cols - first);
                    let mask: __mmask16 = if n == 16 { !0 } else { (1 << n) - 1 };
                    // SAFETY: row i, columns first..first + n are in the destination.
                    unsafe {
                        let at = out.ptr.add(i * out.rs + first);
                        let value = if beta {
                            _mm512_fmadd_ps(s, scale_v, _mm512_maskz_loadu_ps(mask, at))
                        } else {
                            _mm512_mul_ps(s, scale_v)
                        };
                        _mm512_mask_storeu_ps(at, mask, value);
                    }
                }
            }
        } else {
            let mut tile = [[0f32; NR]; MR];
            for (row, sum) in tile.iter_mut().zip(&sums) {
                // SAFETY: a row of the tile holds 32 f32.
                unsafe {
                    for (v, &sum) in sum.iter().enumerate() {
                        _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), sum);
                    }
                }
            }
            for (i, row) in tile.iter().enumerate().take(rows) {
                for (j, &s) in row.iter().enumerate().take(cols) {
                    // SAFETY: (i, j) is in the destination.
                    let d = unsafe { &mut *out.ptr.add(i * out.rs + j * out.cs) };
                    *d = if beta { *d + scale * s } else { scale * s };
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `rows x cols` in a buffer, row-major or column-major.
    fn matrix(rows: usize, cols: usize, transposed: bool, seed: u64) -> (Vec<f32>, usize, usize) {
        let data = values(rows * cols, seed);
        if transposed {
            (data, 1, rows)
        } else {
            (data, cols, 1)
        }
    }

    #[test]
    fn scalar_rounding_matches_the_instruction() {
        if !available() {
            return;
        }
        let mut inputs = values(4096, 7);
        inputs
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x *= (i as f32).exp2().min(1e30));
        inputs.extend([
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-42,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x3f80_8000), // halfway, even below: rounds down
            f32::from_bits(0x3f81_8000), // halfway, odd below: rounds up
            f32::from_bits(0x7f7f_ffff),
        ]);
        inputs.resize(inputs.len().next_multiple_of(32), 0.5);
        for chunk in inputs.chunks_exact(32) {
            let vector = vector_rounding(chunk);
            for (x, bits) in chunk.iter().zip(vector) {
                assert_eq!(bf16_bits(*x), bits, "{x:e} ({:#x})", x.to_bits());
            }
        }
        assert!(f32::from_bits((bf16_bits(f32::NAN) as u32) << 16).is_nan());
    }

    fn vector_rounding(chunk: &[f32]) -> [u16; 32] {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn round(chunk: &[f32], out: &mut [u16; 32]) {
            // SAFETY: `chunk` holds 32 f32 and `out` 32 u16.
            unsafe {
                let lo = _mm512_loadu_ps(chunk.as_ptr());
                let hi = _mm512_loadu_ps(chunk.as_ptr().add(16));
                let rounded = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    out.as_mut_ptr().cast(),
                    std::mem::transmute::<__m512bh, __m512i>(rounded),
                );
            }
        }
        let mut out = [0u16; 32];
        // SAFETY: `available` checked the features.
        unsafe { round(chunk, &mut out) };
        out
    }

    #[test]
    fn matches_the_plain_product_in_every_layout() {
        if !available() {
            // tests/precision.rs checks the error such a CPU gets.
            return;
        }
        let shapes = [
            (1, 1, 1),
            (13, 7, 33),
            (14, 64, 32),
            (15, 257, 31),
            (29, 513, 65),
            (MC + 3, 40, 9),
            (3, 5, NC + 40),
            (70, 600, 100),
        ];
        let mut seed = 1;
        for (m, k, n) in shapes {
            for (lhs_t, rhs_t, dst_t) in [
                (false, false, false),
                (true, false, false),
                (false, true, false),
                (true, true, true),
            ] {
                for (accumulate, scale, threads) in [(false, 1.0, 1), (true, 0.5, 3)] {
                    seed += 1;
                    let (a, a_rs, a_cs) = matrix(m, k, lhs_t, seed);
                    let (b, b_rs, b_cs) = matrix(k, n, rhs_t, seed + 100);
                    let lhs = Mat {
                        data: &a,
                        rows: m,
                        cols: k,
                        rs: a_rs,
                        cs: a_cs,
                    };
                    let rhs = Mat {
                        data: &b,
                        rows: k,
                        cols: n,
                        rs: b_rs,
                        cs: b_cs,
                    };
                    let strides = if dst_t { (1, m) } else { (n, 1) };
                    let before = values(m * n, seed + 200);
                    let (mut ours, mut plain) = (before.clone(), before.clone());
                    matmul(&mut ours, strides, accumulate, scale, lhs, rhs, threads);
                    matmul_plain(&mut plain, strides, accumulate, scale, lhs, rhs);
                    // f32 sums of k products: within k ulps of the sum of magnitudes.
                    let bound = 2.0 * k as f32 * f32::EPSILON + 1e-6;
                    for i in 0..m {
                        for j in 0..n {
                            let at = i * strides.0 + j * strides.1;
                            let magnitude: f32 = (0..k)
                                .map(|l| (a[i * a_rs + l * a_cs] * b[l * b_rs + j * b_cs]).abs())
                                .sum::<f32>()
                                + before[at].abs();
                            assert!(
                                (ours[at] - plain[at]).abs() <= bound * magnitude,
                                "{m}x{k}x{n} {lhs_t} {rhs_t} {dst_t} {accumulate}: ({i}, {j}) {} vs {}",
                                ours[at],
                                plain[at]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounds_the_operands() {
        if !available() {
            return;
        }
        // 1 + 2^-9 is not a bf16 (7 mantissa bits): it rounds to 1, so the product is 1,
        // where f32 operands would give 1 + 2^-9.
        let a = [1.0 + 2f32.powi(-9)];
        let b = [1.0f32];
        let mut dst = [0f32];
        let lhs = Mat::row_major(&a, 1, 1);
        let rhs = Mat::row_major(&b, 1, 1);
        matmul(&mut dst, (1, 1), false, 1.0, lhs, rhs, 1);
        assert_eq!(dst[0], 1.0);
    }
}
