//! GGUF access: metadata getters and tensors dequantized to f32.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// An opened GGUF file: its parsed header plus a reader for tensor data.
pub struct Gguf {
    pub content: Content,
    reader: BufReader<File>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut reader = BufReader::new(f);
        let content = Content::read(&mut reader)?;
        Ok(Self { content, reader })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn req(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| format!("GGUF metadata key `{key}` is missing").into())
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        Ok(value_u64(self.req(key)?).ok_or_else(|| format!("`{key}` is not an integer"))? as u32)
    }

    pub fn u32_or(&self, key: &str, default: u32) -> u32 {
        self.get(key).and_then(value_u64).map_or(default, |v| v as u32)
    }

    pub fn f32_or(&self, key: &str, default: f32) -> f32 {
        self.get(key).and_then(value_f64).map_or(default, |v| v as f32)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        match self.get(key) {
            Some(Value::Bool(b)) => *b,
            Some(v) => value_u64(v).map_or(default, |x| x != 0),
            None => default,
        }
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        match self.req(key)? {
            Value::String(s) => Ok(s),
            _ => Err(format!("`{key}` is not a string").into()),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.req(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(format!("`{key}` holds a non-string").into()),
                })
                .collect(),
            _ => Err(format!("`{key}` is not an array").into()),
        }
    }

    pub fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        match self.req(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| value_f64(v).map(|x| x as f32).ok_or_else(|| format!("`{key}` holds a non-number").into()))
                .collect(),
            _ => Err(format!("`{key}` is not an array").into()),
        }
    }

    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        match self.req(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| value_i64(v).map(|x| x as i32).ok_or_else(|| format!("`{key}` holds a non-integer").into()))
                .collect(),
            _ => Err(format!("`{key}` is not an array").into()),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Shape in candle order (outermost first; for a weight matrix `[out, in]`).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| format!("tensor `{name}` is missing"))?
            .shape
            .dims()
            .to_vec())
    }

    /// Reads a tensor and dequantizes it to f32.
    pub fn tensor_f32(&mut self, name: &str) -> Result<Tensor> {
        let q =
            self.content.tensor(&mut self.reader, name, &Device::Cpu).map_err(|e| format!("tensor `{name}`: {e}"))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    /// Reads a tensor as a flat f32 vector.
    pub fn vec_f32(&mut self, name: &str) -> Result<Vec<f32>> {
        Ok(self.tensor_f32(name)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Storage type name of a tensor (for reporting).
    pub fn dtype_name(&self, name: &str) -> String {
        self.content.tensor_infos.get(name).map_or_else(|| "-".into(), |t| format!("{:?}", t.ggml_dtype))
    }
}

pub fn value_u64(v: &Value) -> Option<u64> {
    Some(match v {
        Value::U8(x) => *x as u64,
        Value::I8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::I16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::I32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I64(x) => *x as u64,
        Value::Bool(b) => *b as u64,
        _ => return None,
    })
}

pub fn value_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        _ => return None,
    })
}

pub fn value_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        other => return value_i64(other).map(|x| x as f64),
    })
}

/// Short rendering of a metadata value (arrays abbreviated).
pub fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{} items]", a.len()),
        Value::String(s) if s.len() > 80 => format!("{:?}...", &s[..s.floor_char_boundary(80)]),
        Value::String(s) => format!("{s:?}"),
        other => format!("{other:?}"),
    }
}
