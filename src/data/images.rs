//! Images from IDX files (MNIST, Fashion-MNIST), scaled for a score model.

use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::RngCore;

use super::{Dataset, Empirical};
use crate::{Error, Result};

/// Where Debian's `dataset-fashion-mnist` package installs Fashion-MNIST.
///
/// ```
/// let dir = std::path::Path::new(scoresde::data::FASHION_MNIST_DIR);
/// assert!(dir.ends_with("fashion-mnist"));
/// ```
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The contents of an IDX file of unsigned bytes (type code `0x08`): the format of
/// MNIST and Fashion-MNIST.
///
/// ```
/// use scoresde::data::IdxArray;
/// // Magic 0x00000803 (u8, 3 dimensions), dims 2×1×2, then the bytes.
/// let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
/// bytes.extend([0, 255, 10, 20]);
/// let idx = IdxArray::from_bytes(&bytes)?;
/// assert_eq!(idx.dims, [2, 1, 2]);
/// assert_eq!(idx.data, [0, 255, 10, 20]);
/// assert!(IdxArray::from_bytes(&bytes[..18]).is_err()); // truncated
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first (`[N, rows, columns]` for images, `[N]` for labels).
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

impl IdxArray {
    /// Reads an IDX file, gzipped (`.gz`, detected by its magic bytes) or not.
    ///
    /// Errors name the file: missing, not IDX (wrong magic number), not of unsigned bytes,
    /// truncated, or with trailing bytes.
    ///
    /// ```no_run
    /// let labels = scoresde::data::IdxArray::read("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")?;
    /// assert_eq!(labels.dims, [10_000]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
        let raw = std::fs::read(path).map_err(|e| bad(format!("cannot read the file ({e})")))?;
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .map_err(|e| bad(format!("not a valid gzip file ({e})")))?;
            out
        } else {
            raw
        };
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::Data(msg) => bad(msg),
            other => other,
        })
    }

    /// Parses the bytes of an (uncompressed) IDX file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |what: String| Err(Error::Data(what));
        if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
            return bad(format!(
                "not an IDX file: the magic number must start with two zero bytes, got {:02x?}",
                &bytes[..bytes.len().min(4)]
            ));
        }
        if bytes[2] != 0x08 {
            return bad(format!(
                "IDX type code 0x{:02x} is not supported: only unsigned bytes (0x08), as in MNIST",
                bytes[2]
            ));
        }
        let rank = bytes[3] as usize;
        let header = 4 + 4 * rank;
        if rank == 0 || bytes.len() < header {
            return bad(format!(
                "truncated IDX header: {rank} dimensions need {header} bytes, the file has {}",
                bytes.len()
            ));
        }
        let dims: Vec<usize> = bytes[4..header]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let count = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::Data(format!("IDX dimensions {dims:?} overflow")))?;
        let body = bytes.len() - header;
        if body != count {
            return bad(format!(
                "the IDX header announces {dims:?} = {count} values but the file holds {body}: {}",
                if body < count {
                    "truncated"
                } else {
                    "trailing bytes"
                }
            ));
        }
        Ok(Self {
            dims,
            data: bytes[header..].to_vec(),
        })
    }
}

/// Which part of a dataset split into training and test files.
///
/// ```
/// use scoresde::data::Split;
/// assert_ne!(Split::Train, Split::Test);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training images (`train-*`: 60,000 for (Fashion-)MNIST).
    Train,
    /// The test images (`t10k-*`: 10,000).
    Test,
}

/// 8-bit images (`[N, C, H, W]`) with optional labels, ready to train a score model.
///
/// Pixels `p ∈ {0, …, 255}` are stored as `x = p/127.5 − 1 ∈ [−1, 1]` in f32 (score_sde's
/// centered scaling); [`ImageDataset::to_pixels`] is the inverse. As a [`Dataset`] it draws
/// images uniformly with replacement, like [`Empirical`].
///
/// ```
/// use rand::{rngs::StdRng, SeedableRng};
/// use scoresde::data::{Dataset, ImageDataset};
/// // Two 1×2×2 images.
/// let data = ImageDataset::from_pixels(vec![0, 255, 0, 255, 51, 51, 51, 51], [2, 1, 2, 2], Some(vec![3, 7]))?;
/// assert_eq!(data.images().flatten_all()?.to_vec1::<f32>()?[..2], [-1.0, 1.0]);
/// assert_eq!(data.labels(), Some(&[3u8, 7][..]));
/// let batch = data.sample(5, &mut StdRng::seed_from_u64(0))?;
/// assert_eq!(batch.dims(), [5, 1, 2, 2]);
/// // Back to pixel values, rounded and clamped to 0..=255:
/// let pixels = ImageDataset::to_pixels(data.images())?;
/// assert_eq!(pixels.flatten_all()?.to_vec1::<u8>()?[4..], [51; 4]);
/// # Ok::<(), scoresde::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ImageDataset {
    images: Empirical,
    labels: Option<Vec<u8>>,
}

impl ImageDataset {
    /// Images from raw 8-bit pixels, row-major `[N, C, H, W]`, and optional labels (one per
    /// image).
    pub fn from_pixels(pixels: Vec<u8>, shape: [usize; 4], labels: Option<Vec<u8>>) -> Result<Self> {
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if count != Some(pixels.len()) || shape.contains(&0) {
            return Err(Error::Shape(format!(
                "{} pixels do not fill images of shape {shape:?} (every dimension must be > 0)",
                pixels.len()
            )));
        }
        if let Some(labels) = &labels {
            if labels.len() != shape[0] {
                return Err(Error::Shape(format!(
                    "{} labels for {} images",
                    labels.len(),
                    shape[0]
                )));
            }
        }
        let images = Tensor::from_vec(pixels, shape.to_vec(), &Device::Cpu)?.to_dtype(DType::F32)?;
        let images = images.affine(1.0 / 127.5, -1.0)?;
        Ok(Self {
            images: Empirical::new(images)?,
            labels,
        })
    }

    /// Images (and labels, if a path is given) from IDX files: `[N, rows, columns]` images
    /// become `[N, 1, rows, columns]`.
    ///
    /// ```no_run
    /// use std::path::Path;
    /// let dir = Path::new("/usr/share/datasets/fashion-mnist");
    /// let data = scoresde::data::ImageDataset::from_idx(
    ///     dir.join("t10k-images-idx3-ubyte.gz"),
    ///     Some(&dir.join("t10k-labels-idx1-ubyte.gz")),
    /// )?;
    /// assert_eq!(data.len(), 10_000);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn from_idx(images: impl AsRef<Path>, labels: Option<&Path>) -> Result<Self> {
        let path = images.as_ref();
        let idx = IdxArray::read(path)?;
        let shape = match idx.dims[..] {
            [n, h, w] => [n, 1, h, w],
            [n, c, h, w] => [n, c, h, w],
            _ => {
                return Err(Error::Data(format!(
                    "{}: expected images of 3 or 4 dimensions, got {:?}",
                    path.display(),
                    idx.dims
                )))
            }
        };
        let labels = match labels {
            Some(p) => {
                let l = IdxArray::read(p)?;
                if l.dims.len() != 1 {
                    return Err(Error::Data(format!(
                        "{}: labels must have one dimension, got {:?}",
                        p.display(),
                        l.dims
                    )));
                }
                Some(l.data)
            }
            None => None,
        };
        Self::from_pixels(idx.data, shape, labels)
    }

    /// Fashion-MNIST (or MNIST: same file names) from a directory holding
    /// `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, gzipped (`.gz`) or not.
    ///
    /// On Debian, `apt-get install dataset-fashion-mnist` puts them in
    /// [`FASHION_MNIST_DIR`]; elsewhere download the four files from
    /// <https://github.com/zalandoresearch/fashion-mnist>. A missing file is an
    /// [`Error::Data`] that says so.
    ///
    /// ```no_run
    /// use scoresde::data::{ImageDataset, Split, FASHION_MNIST_DIR};
    /// let test = ImageDataset::fashion_mnist(FASHION_MNIST_DIR, Split::Test)?;
    /// assert_eq!(test.images().dims(), [10_000, 1, 28, 28]);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn fashion_mnist(dir: impl AsRef<Path>, split: Split) -> Result<Self> {
        let dir = dir.as_ref();
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let find = |stem: String| {
            [format!("{stem}.gz"), stem.clone()]
                .into_iter()
                .map(|name| dir.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::Data(format!(
                        "no {stem}[.gz] in {}: on Debian run `apt-get install dataset-fashion-mnist` (it installs into {FASHION_MNIST_DIR}); \
                         elsewhere download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and \
                         t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist into one directory and pass it",
                        dir.display()
                    ))
                })
        };
        let images = find(format!("{prefix}-images-idx3-ubyte"))?;
        let labels = find(format!("{prefix}-labels-idx1-ubyte"))?;
        Self::from_idx(images, Some(&labels))
    }

    /// The first `n` images (and labels), or all of them if there are fewer.
    ///
    /// ```
    /// let data = scoresde::data::ImageDataset::from_pixels(vec![0; 12], [3, 1, 2, 2], None)?;
    /// assert_eq!(data.take(2)?.len(), 2);
    /// # Ok::<(), scoresde::Error>(())
    /// ```
    pub fn take(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len()).max(1);
        Ok(Self {
            images: Empirical::new(self.images().narrow(0, 0, n)?)?,
            labels: self.labels.as_ref().map(|l| l[..n].to_vec()),
        })
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Always `false`: a dataset holds at least one image.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// All images, `[N, C, H, W]` f32 in `[−1, 1]`.
    pub fn images(&self) -> &Tensor {
        self.images.data()
    }

    /// The labels, one per image, if they were loaded.
    pub fn labels(&self) -> Option<&[u8]> {
        self.labels.as_deref()
    }

    /// The inverse of the scaling: `x ∈ [−1, 1]` back to pixels `round(127.5(x + 1))`,
    /// clamped to `0..=255`, as u8 (for writing images of samples).
    pub fn to_pixels(x: &Tensor) -> Result<Tensor> {
        Ok(((x.to_dtype(DType::F32)? + 1.0)? * 127.5)?
            .round()?
            .clamp(0.0, 255.0)?
            .to_dtype(DType::U8)?)
    }
}

impl Dataset for ImageDataset {
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Result<Tensor> {
        self.images.sample(n, rng)
    }
}
