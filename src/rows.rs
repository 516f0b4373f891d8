//! Row views: how keys, values, queries and outputs are handed to the cache.
//!
//! A row is one token: `n_heads * head_dim` elements, heads one after another. Rows are `stride`
//! elements apart, so an engine can pass a slice of a larger fused QKV buffer without copying.

use crate::config::DType;
use crate::error::{Error, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the cache accepts: `f32`, `half::f16` or `half::bf16`.
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static + std::fmt::Debug {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widen to f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// Round from f32 (to nearest even).
    fn from_f32(v: f32) -> Self;
    /// Widens `src` into `dst` (same length): [`Element::to_f32`] of each, vectorized where the
    /// CPU allows (F16C for f16).
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.to_f32());
    }
    /// Rounds `src` into `dst` (same length): [`Element::from_f32`] of each, vectorized where
    /// the CPU allows.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = Self::from_f32(s));
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

fn check_shape(what: &'static str, len: usize, rows: usize, row_len: usize, stride: usize) -> Result<()> {
    if row_len == 0 {
        return Err(Error::Shape { what, detail: "row length 0".into() });
    }
    if stride < row_len {
        return Err(Error::Shape { what, detail: format!("stride {stride} shorter than the row length {row_len}") });
    }
    let need = if rows == 0 { Some(0) } else { (rows - 1).checked_mul(stride).and_then(|v| v.checked_add(row_len)) };
    match need {
        Some(need) if need <= len => Ok(()),
        _ => Err(Error::Shape {
            what,
            detail: format!("{rows} rows of {row_len} elements, {stride} apart, do not fit in {len} elements"),
        }),
    }
}

/// Read-only rows of one element type.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a, T: Element> {
    data: &'a [T],
    rows: usize,
    row_len: usize,
    stride: usize,
}

impl<'a, T: Element> Rows<'a, T> {
    /// `rows` contiguous rows filling `data` exactly (the row length is `data.len() / rows`).
    pub fn new(data: &'a [T], rows: usize) -> Result<Self> {
        if rows == 0 || data.len() % rows != 0 {
            return Err(Error::Shape {
                what: "rows",
                detail: format!("{} elements do not split into {rows} equal rows", data.len()),
            });
        }
        Self::strided(data, rows, data.len() / rows, data.len() / rows)
    }

    /// `rows` rows of `row_len` elements, the starts of consecutive rows `stride` elements apart.
    pub fn strided(data: &'a [T], rows: usize, row_len: usize, stride: usize) -> Result<Self> {
        check_shape("rows", data.len(), rows, row_len, stride)?;
        Ok(Rows { data, rows, row_len, stride })
    }

    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.stride..i * self.stride + self.row_len]
    }

    /// A view of rows `start..start + n`.
    pub(crate) fn sub(&self, start: usize, n: usize) -> Rows<'a, T> {
        let data = if n == 0 { &self.data[..0] } else { &self.data[start * self.stride..] };
        Rows { data, rows: n, row_len: self.row_len, stride: self.stride }
    }

    pub(crate) fn with_what(self, what: &'static str, rows: usize, row_len: usize) -> Result<Self> {
        if self.rows != rows || self.row_len != row_len {
            return Err(Error::Shape {
                what,
                detail: format!(
                    "expected {rows} rows of {row_len} elements, got {} rows of {}",
                    self.rows, self.row_len
                ),
            });
        }
        Ok(self)
    }

    /// Finds the first NaN or infinity, or a value beyond the f16 range when `f16_range` is set
    /// (scales and zeros are f16, so quantized data must fit it).
    pub(crate) fn check_finite(&self, what: &'static str, f16_range: bool) -> Result<()> {
        // First a pass without branches (it vectorizes): the largest magnitude's bits, which a
        // NaN or an infinity exceeds; only when that fails are elements tested one by one, to
        // name the first culprit.
        let limit = if f16_range { crate::quant::F16_LIMIT } else { f32::MAX }.to_bits();
        let mut buf = [0f32; 256];
        let mut fine = |row: &[T]| {
            row.chunks(buf.len()).all(|c| {
                let b = &mut buf[..c.len()];
                T::to_f32_slice(c, b);
                b.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)) <= limit
            })
        };
        if (0..self.rows).all(|t| fine(self.row(t))) {
            return Ok(());
        }
        for t in 0..self.rows {
            for (i, &x) in self.row(t).iter().enumerate() {
                let v = x.to_f32();
                if !v.is_finite() {
                    let kind = if v.is_nan() { "NaN" } else { "infinity" };
                    return Err(Error::NonFinite { what, kind, token: t, index: i, value: v });
                }
                if f16_range && v.abs() > crate::quant::F16_LIMIT {
                    return Err(Error::NonFinite {
                        what,
                        kind: "value beyond the f16 range",
                        token: t,
                        index: i,
                        value: v,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Writable rows of one element type (attention outputs).
#[derive(Debug)]
pub struct RowsMut<'a, T: Element> {
    data: &'a mut [T],
    rows: usize,
    row_len: usize,
    stride: usize,
}

impl<'a, T: Element> RowsMut<'a, T> {
    /// `rows` contiguous rows filling `data` exactly.
    pub fn new(data: &'a mut [T], rows: usize) -> Result<Self> {
        if rows == 0 || data.len() % rows != 0 {
            return Err(Error::Shape {
                what: "output rows",
                detail: format!("{} elements do not split into {rows} equal rows", data.len()),
            });
        }
        let n = data.len() / rows;
        Self::strided(data, rows, n, n)
    }

    /// `rows` rows of `row_len` elements, `stride` elements apart.
    pub fn strided(data: &'a mut [T], rows: usize, row_len: usize, stride: usize) -> Result<Self> {
        check_shape("output rows", data.len(), rows, row_len, stride)?;
        Ok(RowsMut { data, rows, row_len, stride })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Row `i`, writable.
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        &mut self.data[i * self.stride..i * self.stride + self.row_len]
    }

    /// Row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.stride..i * self.stride + self.row_len]
    }

    /// The start of row 0 and the distance between rows in elements, for kernels that write
    /// disjoint parts of rows from several threads.
    pub(crate) fn raw_parts(&mut self) -> (*mut T, usize) {
        (self.data.as_mut_ptr(), self.stride)
    }

    pub(crate) fn check(&self, rows: usize, row_len: usize) -> Result<()> {
        if self.rows != rows || self.row_len != row_len {
            return Err(Error::Shape {
                what: "output",
                detail: format!(
                    "expected {rows} rows of {row_len} elements, got {} rows of {}",
                    self.rows, self.row_len
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice conversions round and widen each element exactly as the scalar ones do, on
    /// every length around the 8-wide vector chunks and over f16's edges: subnormals, values
    /// halfway between two f16s, overflow to infinity, signed zeros.
    fn slices_match_scalars<E: Element + PartialEq>() {
        let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, -1.5, 65504.0, 65520.0, -70000.0, 1e-8, -3e-6, 6.1e-5];
        // Halfway cases of f16 near 1 (its step there is 2^-10), and a spread of magnitudes.
        xs.extend((0..16).map(|i| 1.0 + (2 * i + 1) as f32 * 2f32.powi(-11)));
        xs.extend((0..40).map(|i| (i as f32 * 0.7311).sin() * 10f32.powi(i % 9 - 4)));
        for n in 0..xs.len() {
            let src = &xs[..n];
            let mut got = vec![E::from_f32(7.0); n];
            E::from_f32_slice(src, &mut got);
            let want: Vec<E> = src.iter().map(|&x| E::from_f32(x)).collect();
            assert!(got == want, "{:?}: rounding {n} elements", E::DTYPE);
            let mut wide = vec![0f32; n];
            E::to_f32_slice(&got, &mut wide);
            for (w, g) in wide.iter().zip(&got) {
                assert_eq!(w.to_bits(), g.to_f32().to_bits(), "{:?}: widening {g:?}", E::DTYPE);
            }
        }
    }

    /// `check_finite` names the first bad element, whatever its row, its place around the
    /// 256-element blocks of the fast pass, and the element type; the largest finite values
    /// and the f16 range's ends pass.
    fn finite_checks<E: Element>() {
        let (rows, row_len, stride) = (3, 600, 613);
        let base: Vec<E> = (0..rows * stride).map(|i| E::from_f32((i as f32 * 0.37).sin() * 3.0)).collect();
        let check =
            |data: &[E], f16_range| Rows::strided(data, rows, row_len, stride).unwrap().check_finite("keys", f16_range);
        assert_eq!(check(&base, true), Ok(()));
        // Between the rows (the stride's gap) nothing is looked at.
        let mut gap = base.clone();
        gap[row_len + 3] = E::from_f32(f32::NAN);
        assert_eq!(check(&gap, true), Ok(()));
        let (inf, nan) = (E::from_f32(f32::INFINITY), E::from_f32(f32::NAN));
        for (t, i) in [(0, 0), (0, 255), (1, 256), (1, 599), (2, 300), (2, 599)] {
            let at = t * stride + i;
            let mut data = base.clone();
            // A NaN, also behind an earlier infinity in a later row: the first one is named.
            data[at] = nan;
            let e = check(&data, false).unwrap_err();
            assert!(matches!(e, Error::NonFinite { kind: "NaN", token, index, .. } if (token, index) == (t, i)), "{e}");
            let last = (rows - 1) * stride + row_len - 1;
            data[last] = nan;
            data[at] = E::from_f32(f32::NEG_INFINITY);
            let e = check(&data, false).unwrap_err();
            assert!(
                matches!(e, Error::NonFinite { kind: "infinity", token, index, .. } if (token, index) == (t, i)),
                "{e}"
            );
            data[last] = base[last];
            data[at] = inf;
            assert!(check(&data, true).is_err());
            // The f16 range is a limit for keys and values only (f16 and bf16 round the largest
            // values to infinity).
            for v in [65504.0f32, -65504.0, 65600.0, -1e6, f32::MAX] {
                data[at] = E::from_f32(v);
                let v = data[at].to_f32();
                let (all, f16_range) = (check(&data, false), check(&data, true));
                if v.abs() <= 65504.0 {
                    assert_eq!((all, f16_range), (Ok(()), Ok(())), "{v}");
                    continue;
                }
                let e = f16_range.unwrap_err();
                assert!(matches!(e, Error::NonFinite { token, index, .. } if (token, index) == (t, i)), "{e}");
                if v.is_finite() {
                    assert_eq!(all, Ok(()), "{v}");
                    assert!(e.to_string().contains("beyond the f16 range"), "{e}");
                } else {
                    assert_ne!(E::DTYPE, DType::F32, "{v}");
                    assert_eq!(all, Err(e));
                }
            }
        }
    }

    #[test]
    fn finite_checks_name_the_first_bad_element() {
        finite_checks::<f16>();
        finite_checks::<bf16>();
        finite_checks::<f32>();
    }

    #[test]
    fn slice_conversions_match_the_scalar_ones() {
        slices_match_scalars::<f16>();
        slices_match_scalars::<bf16>();
        slices_match_scalars::<f32>();
    }
}
