//! Table, CSV, JSON lines and the PNG plot.

use crate::eval::ConfigResult;
use crate::gguf::Result;
use std::path::Path;

pub fn table(rs: &[ConfigResult]) -> String {
    let mut s = String::new();
    s.push_str("| config | bits/elem | kv bytes | ppl | ppl ratio | mean KLD | top-1 |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for r in rs {
        s.push_str(&format!(
            "| {} | {:.2} | {} | {:.4} | {:.4} | {:.5} | {:.2}% |\n",
            r.name,
            r.bits_per_element,
            r.kv_bytes,
            r.ppl,
            r.ppl_ratio,
            r.kld,
            r.top1 * 100.0
        ));
    }
    s
}

pub fn csv(rs: &[ConfigResult]) -> String {
    let mut s = String::from("config,bits_per_element,kv_bytes,ppl,ppl_ratio,kld,top1,tokens\n");
    for r in rs {
        s.push_str(&format!(
            "{},{:.4},{},{:.6},{:.6},{:.7},{:.6},{}\n",
            r.name, r.bits_per_element, r.kv_bytes, r.ppl, r.ppl_ratio, r.kld, r.top1, r.count
        ));
    }
    s
}

/// Reads back a CSV written by [`csv`].
pub fn read_csv(text: &str) -> Result<Vec<ConfigResult>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 8 {
            return Err(format!("CSV line {}: expected 8 fields", i + 1).into());
        }
        let num = |j: usize| -> Result<f64> {
            f[j].trim().parse::<f64>().map_err(|e| format!("CSV line {}: {e}", i + 1).into())
        };
        out.push(ConfigResult {
            name: f[0].to_string(),
            bits_per_element: num(1)?,
            kv_bytes: num(2)? as usize,
            ppl: num(3)?,
            ppl_ratio: num(4)?,
            kld: num(5)?,
            top1: num(6)?,
            count: num(7)? as usize,
            nll_sum: 0.0,
        });
    }
    Ok(out)
}

pub fn json_line(r: &ConfigResult) -> String {
    format!(
        "{{\"config\":\"{}\",\"bits_per_element\":{:.4},\"ppl\":{:.6},\"ppl_ratio\":{:.6},\"kld\":{:.7},\"top1\":{:.6},\"kv_bytes\":{}}}",
        r.name, r.bits_per_element, r.ppl, r.ppl_ratio, r.kld, r.top1, r.kv_bytes
    )
}

/// Draws mean KLD (log scale) against bits per element as a PNG: one point
/// per quantized configuration (the exact one has KLD 0 and is left out),
/// KIVI (per-channel keys) in blue, per-token-key baselines in red.
pub fn plot_png(rs: &[ConfigResult], path: &Path) -> Result<()> {
    let (w, h) = (900usize, 600usize);
    let mut c = Canvas::new(w, h);
    let (x0, x1, y0, y1) = (110usize, w - 40, 60usize, h - 90);
    let pts: Vec<&ConfigResult> = rs.iter().filter(|r| r.kld > 0.0).collect();
    let xmax = pts.iter().map(|r| r.bits_per_element).fold(1.0f64, f64::max) * 1.1;
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for r in &pts {
        lo = lo.min(r.kld.log10());
        hi = hi.max(r.kld.log10());
    }
    if !lo.is_finite() {
        (lo, hi) = (-3.0, 0.0);
    }
    let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
    let px = |b: f64| x0 as f64 + b / xmax * (x1 - x0) as f64;
    let py = |k: f64| y1 as f64 - (k.log10() - lo) / (hi - lo) * (y1 - y0) as f64;
    let grey = [225, 225, 225];
    let black = [0, 0, 0];
    // grid and tick labels
    let mut d = lo;
    while d <= hi + 1e-9 {
        let y = py(10f64.powf(d)) as usize;
        c.hline(x0, x1, y, grey);
        let lab = format!("1E{}", d as i64);
        c.text(x0 - 12 - lab.len() * 12, y - 7, &lab, 2, black);
        d += 1.0;
    }
    let step = nice_step(xmax / 8.0);
    let mut b = 0.0;
    while b <= xmax + 1e-9 {
        let x = px(b) as usize;
        c.vline(x, y0, y1, grey);
        let lab = if step < 1.0 { format!("{b:.1}") } else { format!("{b:.0}") };
        c.text(x.saturating_sub(lab.len() * 6), y1 + 10, &lab, 2, black);
        b += step;
    }
    c.hline(x0, x1, y1, black);
    c.vline(x0, y0, y1, black);
    c.text(x0, 20, "MEAN KL DIVERGENCE FROM THE EXACT CACHE (LOG) VS BITS PER ELEMENT", 2, black);
    c.text((x0 + x1) / 2 - 8 * 12, h - 40, "BITS PER ELEMENT", 2, black);
    // Variants of one configuration share its x: each label takes the nearest free line
    // (16 pixels apart) above or below its point's.
    let mut placed: Vec<(i64, i64, i64)> = Vec::new();
    for r in pts {
        let (x, y) = (px(r.bits_per_element) as i64, py(r.kld) as i64);
        let col = if r.name.starts_with("ktok") {
            [200, 30, 30]
        } else if r.name.ends_with("-mm") {
            [110, 110, 110]
        } else {
            [30, 80, 200]
        };
        c.disc(x, y, 6, col);
        let (lx0, lx1) = (x + 10, x + 10 + 12 * r.name.len() as i64);
        let free = |ly: i64| placed.iter().all(|&(a, b, py)| lx1 <= a || b <= lx0 || (ly - py).abs() >= 16);
        let ly = (0..40).map(|i| y - 7 + if i % 2 == 0 { 8 * i } else { -8 * (i + 1) }).find(|&ly| free(ly));
        let ly = ly.unwrap_or(y - 7);
        placed.push((lx0, lx1, ly));
        c.text(lx0 as usize, ly.max(0) as usize, &r.name.to_uppercase(), 2, col);
    }
    let f = std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&c.px)?;
    Ok(())
}

fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= raw {
            return m * p;
        }
    }
    10.0 * p
}

/// An RGB raster with just what the plot needs.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self { w, h, px: vec![255; w * h * 3] }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn hline(&mut self, x0: usize, x1: usize, y: usize, c: [u8; 3]) {
        for x in x0..=x1 {
            self.set(x as i64, y as i64, c);
        }
    }

    fn vline(&mut self, x: usize, y0: usize, y1: usize, c: [u8; 3]) {
        for y in y0..=y1 {
            self.set(x as i64, y as i64, c);
        }
    }

    fn disc(&mut self, cx: i64, cy: i64, r: i64, c: [u8; 3]) {
        for dy in -r..=r {
            for dx in -r..=r {
                if dx * dx + dy * dy <= r * r {
                    self.set(cx + dx, cy + dy, c);
                }
            }
        }
    }

    /// 5x7 glyphs scaled by `s`, 6*s pixels per character.
    fn text(&mut self, x: usize, y: usize, t: &str, s: usize, c: [u8; 3]) {
        for (i, ch) in t.chars().enumerate() {
            let g = glyph(ch.to_ascii_uppercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        for dy in 0..s {
                            for dx in 0..s {
                                self.set((x + i * 6 * s + col * s + dx) as i64, (y + row * s + dy) as i64, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn glyph(c: char) -> [u8; 7] {
    match c {
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        _ => [0; 7],
    }
}
