//! ROAD's noisy linear imputation (Rong et al. 2022, pytorch-grad-cam's `NoisyLinearImputer`):
//! every removed pixel becomes the weighted mean of its eight neighbours (1/6 for the four
//! direct ones, 1/12 for the diagonals, out-of-image neighbours left out), removed neighbours
//! included, plus Gaussian noise. That is one sparse linear system for all removed pixels.
//!
//! pytorch-grad-cam solves it with scipy's `spsolve`. Candle has no sparse solver and the
//! system is symmetric positive definite, so it is solved here by conjugate gradients.

use rand::Rng;
use rand_distr::StandardNormal;

/// (row offset, column offset, weight) of the neighbours, as pytorch-grad-cam's table.
const NEIGHBOURS: [(isize, isize, f64); 8] = [
    (1, 1, 1.0 / 12.0),
    (0, 1, 1.0 / 6.0),
    (-1, 1, 1.0 / 12.0),
    (1, -1, 1.0 / 12.0),
    (0, -1, 1.0 / 6.0),
    (-1, -1, 1.0 / 12.0),
    (1, 0, 1.0 / 6.0),
    (-1, 0, 1.0 / 6.0),
];

/// Relative residual at which conjugate gradients stop.
const TOLERANCE: f64 = 1e-10;

#[derive(Clone, Copy, Debug)]
pub struct NoisyLinearImputer {
    /// Standard deviation of the noise added to each imputed value (pytorch-grad-cam: 0.01).
    pub noise: f64,
}

impl Default for NoisyLinearImputer {
    fn default() -> Self {
        NoisyLinearImputer { noise: 0.01 }
    }
}

impl NoisyLinearImputer {
    /// `image` is [channels][height * width] (row-major planes); `keep[p]` says whether pixel
    /// p stays. Returns the image with the other pixels imputed. A group of removed pixels
    /// that touches no kept pixel has nothing to interpolate from (scipy's system would be
    /// singular); it becomes 0, the mean of normalised data, plus the noise.
    pub fn impute(
        &self,
        image: &[Vec<f64>],
        height: usize,
        width: usize,
        keep: &[bool],
        rng: &mut impl Rng,
    ) -> Vec<Vec<f64>> {
        let n = height * width;
        assert_eq!(keep.len(), n, "one keep flag per pixel");
        let removed: Vec<usize> = (0..n).filter(|&p| !keep[p]).collect();
        let mut variable = vec![usize::MAX; n];
        for (v, &p) in removed.iter().enumerate() {
            variable[p] = v;
        }
        let neighbours = |p: usize| {
            let (row, col) = ((p / width) as isize, (p % width) as isize);
            NEIGHBOURS.iter().filter_map(move |&(dr, dc, weight)| {
                let (r, c) = (row + dr, col + dc);
                let inside = (0..height as isize).contains(&r) && (0..width as isize).contains(&c);
                inside.then(|| (r as usize * width + c as usize, weight))
            })
        };
        let anchored = anchored_to_kept(&removed, &variable, keep, &neighbours);
        // The system M x = b: M's diagonal is the weight of a pixel's in-image neighbours, its
        // off-diagonals minus the weights between removed pixels; b holds the kept neighbours.
        let diagonal: Vec<f64> = removed
            .iter()
            .map(|&p| neighbours(p).map(|(_, w)| w).sum())
            .collect();
        let apply = |x: &[f64], out: &mut [f64]| {
            for (v, &p) in removed.iter().enumerate() {
                let mut sum = diagonal[v] * x[v];
                for (q, w) in neighbours(p) {
                    if !keep[q] {
                        sum -= w * x[variable[q]];
                    }
                }
                out[v] = if anchored[v] { sum } else { x[v] };
            }
        };
        image
            .iter()
            .map(|plane| {
                let b: Vec<f64> = removed
                    .iter()
                    .enumerate()
                    .map(|(v, &p)| {
                        if !anchored[v] {
                            return 0.0;
                        }
                        neighbours(p)
                            .filter(|&(q, _)| keep[q])
                            .map(|(q, w)| w * plane[q])
                            .sum()
                    })
                    .collect();
                let x = conjugate_gradient(&apply, &b);
                let mut out = plane.clone();
                for (v, &p) in removed.iter().enumerate() {
                    let noise: f64 = rng.sample(StandardNormal);
                    out[p] = x[v] + self.noise * noise;
                }
                out
            })
            .collect()
    }
}

/// Whether each removed pixel is connected, through removed pixels, to a kept one.
fn anchored_to_kept<I: Iterator<Item = (usize, f64)>>(
    removed: &[usize],
    variable: &[usize],
    keep: &[bool],
    neighbours: &impl Fn(usize) -> I,
) -> Vec<bool> {
    let mut anchored = vec![false; removed.len()];
    let mut stack: Vec<usize> = (0..removed.len())
        .filter(|&v| neighbours(removed[v]).any(|(q, _)| keep[q]))
        .collect();
    for &v in &stack {
        anchored[v] = true;
    }
    while let Some(v) = stack.pop() {
        for (q, _) in neighbours(removed[v]) {
            if !keep[q] && !anchored[variable[q]] {
                anchored[variable[q]] = true;
                stack.push(variable[q]);
            }
        }
    }
    anchored
}

/// Solves M x = b for a symmetric positive definite M given as `apply(x, out)`.
fn conjugate_gradient(apply: &impl Fn(&[f64], &mut [f64]), b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x = vec![0.0; n];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut mp = vec![0.0; n];
    let mut rr = dot(&r, &r);
    let stop = TOLERANCE * TOLERANCE * rr;
    for _ in 0..10 * n.max(1) {
        if rr <= stop || rr == 0.0 {
            break;
        }
        apply(&p, &mut mp);
        let alpha = rr / dot(&p, &mp);
        for i in 0..n {
            x[i] += alpha * p[i];
            r[i] -= alpha * mp[i];
        }
        let next = dot(&r, &r);
        let beta = next / rr;
        rr = next;
        for i in 0..n {
            p[i] = r[i] + beta * p[i];
        }
    }
    x
}
