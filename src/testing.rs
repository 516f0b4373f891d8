//! Test data for the crate's own unit tests: a seedable generator of normal numbers, and rows of
//! keys with an outlier channel per head, like real models' keys.

use crate::rows::Element;

/// SplitMix64 with Box-Muller normals.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 / (1u64 << 53) as f64).max(1e-300);
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// `n` normal numbers; with `outliers`, channel 7 of every head of `hd` channels is an
    /// outlier (about 10, spread 3), as keys have.
    pub fn rows<T: Element>(&mut self, n: usize, outliers: bool, hd: usize) -> Vec<T> {
        (0..n)
            .map(|i| {
                let x = self.normal();
                T::from_f32(if outliers && i % hd == 7 { 10.0 + 3.0 * x } else { x })
            })
            .collect()
    }
}

/// Largest difference relative to the largest magnitude of `want`; infinite where a value is NaN
/// (NaN would otherwise drop out of the maximum and pass any tolerance).
pub fn rel_err<T: Element>(got: &[T], want: &[T]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = |(a, b): (&T, &T)| {
        let d = (a.to_f32() as f64 - b.to_f32() as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let num = got.iter().zip(want).map(diff).fold(0.0, f64::max);
    let den = want.iter().map(|b| b.to_f32().abs() as f64).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}
