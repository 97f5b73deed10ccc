//! NumPy `.npy` files: arrays saved with `numpy.save`, read as tensors.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Reads a NumPy `.npy` file (format versions 1 to 3, C order, little-endian `f8`, `f4`,
/// `i8`, `u4` or `u1`) as a tensor of its shape on `device`: f64, f32, i64, u32 or u8.
///
/// Errors name the file: missing, not `.npy`, Fortran order, a big-endian or unsupported
/// type (convert with `a.astype('<f8')` in NumPy), or a length that does not match the
/// shape.
///
/// ```
/// use candle_core::Device;
/// // numpy.save of np.array([[1.0, 2.0]]): magic, version 1.0, header length, header, data.
/// let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }";
/// let mut header = header.to_string();
/// while (10 + header.len() + 1) % 64 != 0 {
///     header.push(' ');
/// }
/// header.push('\n');
/// let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
/// bytes.extend((header.len() as u16).to_le_bytes());
/// bytes.extend(header.as_bytes());
/// for v in [1.0f64, 2.0] {
///     bytes.extend(v.to_le_bytes());
/// }
/// let path = std::env::temp_dir().join("scoresde-npy-doc.npy");
/// std::fs::write(&path, &bytes)?;
/// let x = scoresde::data::read_npy(&path, &Device::Cpu)?;
/// assert_eq!(x.to_vec2::<f64>()?, [[1.0, 2.0]]);
/// std::fs::write(&path, &bytes[..bytes.len() - 1])?;
/// assert!(scoresde::data::read_npy(&path, &Device::Cpu).is_err()); // truncated
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), scoresde::Error>(())
/// ```
pub fn read_npy(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read the file ({e})")))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy format version {v}"))),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| bad("truncated header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("the header is not text".into()))?;
    let descr = header_value(header, "descr").ok_or_else(|| bad(format!("no 'descr' in {header:?}")))?;
    let fortran = header_value(header, "fortran_order")
        .ok_or_else(|| bad(format!("no 'fortran_order' in {header:?}")))?;
    if fortran.trim() != "False" {
        return Err(bad(
            "Fortran-ordered array: save np.ascontiguousarray(a) instead".into()
        ));
    }
    let shape = parse_shape(header).ok_or_else(|| bad(format!("cannot read the shape in {header:?}")))?;
    let (dtype, size) = match descr.trim().trim_matches('\'') {
        "<f8" => (DType::F64, 8),
        "<f4" => (DType::F32, 4),
        "<i8" => (DType::I64, 8),
        "<u4" => (DType::U32, 4),
        "|u1" | "<u1" => (DType::U8, 1),
        other => {
            return Err(bad(format!(
                "type {other} is not supported: convert with a.astype('<f8') (or '<f4', '<i8', '<u4', '|u1')"
            )))
        }
    };
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let data = &bytes[start + header_len..];
    if Some(data.len()) != count.checked_mul(size) {
        return Err(bad(format!(
            "shape {shape:?} of {size}-byte values needs {} data bytes, the file has {}",
            count.saturating_mul(size),
            data.len()
        )));
    }
    let tensor = match dtype {
        DType::F64 => Tensor::from_vec(le_values(data, f64::from_le_bytes), shape, device)?,
        DType::F32 => Tensor::from_vec(le_values(data, f32::from_le_bytes), shape, device)?,
        DType::I64 => Tensor::from_vec(le_values(data, i64::from_le_bytes), shape, device)?,
        DType::U32 => Tensor::from_vec(le_values(data, u32::from_le_bytes), shape, device)?,
        _ => Tensor::from_vec(data.to_vec(), shape, device)?,
    };
    Ok(tensor)
}

/// Little-endian values of `N` bytes each.
fn le_values<T, const N: usize>(data: &[u8], read: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            read(b)
        })
        .collect()
}

/// The text after `'key':` up to the next top-level comma of the header dict.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let rest = &header[header.find(&format!("'{key}'"))? + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    Some(&rest[..rest.find(',')?])
}

/// The `'shape': (a, b, …)` tuple.
fn parse_shape(header: &str) -> Option<Vec<usize>> {
    let rest = &header[header.find("'shape'")? + 7..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('(')?;
    let inner = &rest[..rest.find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect()
}
