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
