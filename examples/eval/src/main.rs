//! kivi-eval: perplexity, KL divergence and top-1 agreement of KV-cache
//! configurations on a real GGUF model. See README.md.

use kivi::attention::{force_isa, Isa};
use kivi_eval::eval::{evaluate_against, windows, CacheSpec, EvalOptions};
use kivi_eval::gguf::{describe, Gguf, Result};
use kivi_eval::llama_ref::RefLogProbs;
use kivi_eval::model::Model;
use kivi_eval::tokenizer::Tokenizer;
use kivi_eval::{report, stores};
use std::path::PathBuf;
use std::time::Instant;

const USAGE: &str = "\
usage: kivi-eval --model FILE.gguf --text FILE.txt [options]
       kivi-eval info --model FILE.gguf
       kivi-eval plot --csv FILE.csv --plot FILE.png
       kivi-eval tokenize --model FILE.gguf --text FILE.txt [--print N]

options:
  --ctx N          window length in tokens (default 1024)
  --chunks N       number of windows (default 8)
  --configs LIST   comma-separated configurations (default: all)
                   exact, kivi8, kivi4, kivi4-s0, kivi4-mm, kivi4-s0-mm, kivi2, kivi2-s0,
                   kivi2-mm, kivi2-s0-mm, kivi2-r0, ktok4, ktok2
                   (kivi<bits>[-r<residual>][-s<sinks>][-mm], ktok<bits>[...]: per-token
                   keys; -s: sink tokens, kivi's default unless given; -mm: the paper's
                   min/max rounding of values, not least squares)
  --csv FILE       write the table as CSV
  --plot FILE      draw KLD against bits per element as PNG
  --dtype T        element type of the caches' full-precision tokens: f16
                   (default; llama.cpp's default KV type) or f32
  --naive          exact configuration through the plain reference attention
                   instead of kivi (for checking the model alone)
  --llama-logits F also compare the exact configuration with the log-probs that
                   llama.cpp's perplexity tool saved with --kl-divergence-base F
                   (same text, --ctx and --chunks)
  --isa I          run kivi's CPU attention on one instruction set: scalar,
                   avx2, avx512 or neon (default: the best this CPU has)
  --quiet          no progress lines
";

struct Args {
    cmd: String,
    model: Option<PathBuf>,
    text: Option<PathBuf>,
    ctx: usize,
    chunks: usize,
    configs: Vec<CacheSpec>,
    csv: Option<PathBuf>,
    plot: Option<PathBuf>,
    naive: bool,
    llama_logits: Option<PathBuf>,
    dtype: stores::WindowType,
    quiet: bool,
    print: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        cmd: "eval".into(),
        model: None,
        text: None,
        ctx: 1024,
        chunks: 8,
        configs: CacheSpec::defaults(),
        csv: None,
        plot: None,
        naive: false,
        llama_logits: None,
        dtype: stores::WindowType::F16,
        quiet: false,
        print: 0,
    };
    let mut it = std::env::args().skip(1).peekable();
    if let Some(c) = it.peek() {
        if !c.starts_with('-') {
            a.cmd = it.next().unwrap();
        }
    }
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--model" => a.model = Some(val("--model")?.into()),
            "--text" => a.text = Some(val("--text")?.into()),
            "--ctx" => a.ctx = val("--ctx")?.parse()?,
            "--chunks" => a.chunks = val("--chunks")?.parse()?,
            "--configs" => {
                let mut v: Vec<CacheSpec> = val("--configs")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(CacheSpec::parse)
                    .collect::<Result<_>>()?;
                // the exact configuration is the reference: always present, first
                v.retain(|c| !c.is_exact());
                v.insert(0, CacheSpec::exact());
                a.configs = v;
            }
            "--csv" => a.csv = Some(val("--csv")?.into()),
            "--plot" => a.plot = Some(val("--plot")?.into()),
            "--print" => a.print = val("--print")?.parse()?,
            "--naive" => a.naive = true,
            "--llama-logits" => a.llama_logits = Some(val("--llama-logits")?.into()),
            "--dtype" => a.dtype = stores::WindowType::parse(&val("--dtype")?)?,
            "--isa" => {
                let name = val("--isa")?;
                let isa =
                    Isa::from_name(&name).ok_or_else(|| format!("--isa {name}: not scalar, avx2, avx512 or neon"))?;
                if !force_isa(Some(isa)) {
                    return Err(format!("--isa {name}: this CPU does not have it").into());
                }
            }
            "--quiet" => a.quiet = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        }
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let a = parse_args()?;
    if a.cmd == "plot" {
        let csv = std::fs::read_to_string(a.csv.as_ref().ok_or("--csv is required")?)?;
        let rs = report::read_csv(&csv)?;
        print!("{}", report::table(&rs));
        return report::plot_png(&rs, a.plot.as_ref().ok_or("--plot is required")?);
    }
    let model_path = a.model.clone().ok_or("--model is required")?;
    let mut g = Gguf::open(&model_path)?;
    match a.cmd.as_str() {
        "info" => {
            let mut keys: Vec<_> = g.content.metadata.keys().cloned().collect();
            keys.sort();
            for k in keys {
                println!("{k} = {}", describe(&g.content.metadata[&k]));
            }
            let mut t: Vec<_> = g.content.tensor_infos.keys().cloned().collect();
            t.sort();
            for n in t {
                println!("{n} {:?} {}", g.shape(&n)?, g.dtype_name(&n));
            }
            return Ok(());
        }
        "tokenize" => {
            let tok = Tokenizer::from_gguf(&g)?;
            let text = std::fs::read_to_string(a.text.as_ref().ok_or("--text is required")?)?;
            let t0 = Instant::now();
            let ids = tok.encode(&text, true);
            println!("{} tokens in {:.2}s", ids.len(), t0.elapsed().as_secs_f64());
            for &id in ids.iter().take(a.print) {
                println!("{id}\t{:?}", tok.tokens[id as usize]);
            }
            return Ok(());
        }
        "eval" => {}
        other => return Err(format!("unknown command `{other}`\n{USAGE}").into()),
    }
    let text_path = a.text.clone().ok_or("--text is required")?;
    let progress = !a.quiet;
    let t0 = Instant::now();
    let tok = Tokenizer::from_gguf(&g)?;
    let text = std::fs::read_to_string(&text_path)?;
    let ids = tok.encode(&text, true);
    let model = Model::load(&mut g)?;
    drop(g);
    if progress {
        eprintln!(
            "[load] {:?} {} layers, vocab {}, {} tokens of text, {:.1}s",
            model.cfg.arch,
            model.cfg.n_layers,
            model.cfg.vocab,
            ids.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let wins = windows(&ids, a.ctx, a.chunks, tok.bos)?;
    let mut st = a
        .configs
        .iter()
        .map(|s| stores::make(s, &model.cfg, wins.len(), a.ctx, a.dtype, a.naive))
        .collect::<Result<Vec<_>>>()?;
    let opts = EvalOptions { ctx: a.ctx, chunks: a.chunks, progress };
    let reference = a.llama_logits.as_deref().map(RefLogProbs::read).transpose()?;
    let (results, cmp) = evaluate_against(&model, &wins, &a.configs, &mut st, &opts, reference.as_ref())?;
    let elapsed = t0.elapsed().as_secs_f64();
    print!("{}", report::table(&results));
    println!(
        "ctx {} windows {} scored tokens {} configs {} time {:.1}s",
        a.ctx,
        wins.len(),
        results[0].count,
        results.len(),
        elapsed
    );
    if let Some(c) = &cmp {
        println!(
            "llama.cpp reference: {} positions, token mismatches {}, ppl {:.4} (llama.cpp) vs {:.4} (exact here): {:+.3}%, \
             mean KLD {:.6}, max KLD {:.5}, same top-1 {:.2}%",
            c.count,
            c.token_mismatches,
            c.ppl_ref,
            c.ppl,
            (c.ppl / c.ppl_ref - 1.0) * 100.0,
            c.kld,
            c.kld_max,
            c.top1 * 100.0
        );
    }
    if let Some(p) = &a.csv {
        std::fs::write(p, report::csv(&results))?;
    }
    if let Some(p) = &a.plot {
        report::plot_png(&results, p)?;
    }
    for r in &results {
        println!("{}", report::json_line(r));
    }
    Ok(())
}
