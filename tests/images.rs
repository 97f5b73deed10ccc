//! IDX files and image datasets, on tiny files each test writes itself.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, SeedableRng};
use scoresde::data::{Dataset, IdxArray, ImageDataset, Split};
use scoresde::Error;

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("scoresde-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(data);
    bytes
}

fn write(path: &Path, bytes: &[u8], gzip: bool) {
    let mut file = std::fs::File::create(path).unwrap();
    if gzip {
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap();
    } else {
        file.write_all(bytes).unwrap();
    }
}

/// Three 2×3 images with pixel values 0..18 and labels 4, 5, 6, in the four files of
/// Fashion-MNIST's layout (the training pair gzipped, the test pair plain).
fn fake_fashion_mnist(dir: &TempDir) -> Vec<u8> {
    let pixels: Vec<u8> = (0..18).map(|i| (i * 15) as u8).collect();
    for (prefix, gzip) in [("train", true), ("t10k", false)] {
        let ext = if gzip { ".gz" } else { "" };
        write(
            &dir.path(&format!("{prefix}-images-idx3-ubyte{ext}")),
            &idx_bytes(&[3, 2, 3], &pixels),
            gzip,
        );
        write(
            &dir.path(&format!("{prefix}-labels-idx1-ubyte{ext}")),
            &idx_bytes(&[3], &[4, 5, 6]),
            gzip,
        );
    }
    pixels
}

#[test]
fn reads_gzipped_and_plain_idx_files() -> scoresde::Result<()> {
    let dir = TempDir::new("read");
    let pixels = fake_fashion_mnist(&dir);
    for split in [Split::Train, Split::Test] {
        let data = ImageDataset::fashion_mnist(&dir.0, split)?;
        assert_eq!(data.len(), 3);
        assert_eq!(data.images().dims(), [3, 1, 2, 3]);
        assert_eq!(data.labels(), Some(&[4u8, 5, 6][..]));
        // x = p/127.5 − 1, exactly invertible on the 256 levels.
        let x = data.images().flatten_all()?.to_vec1::<f32>()?;
        for (&p, &v) in pixels.iter().zip(&x) {
            assert!((v - (p as f32 / 127.5 - 1.0)).abs() < 1e-6);
        }
        let back = ImageDataset::to_pixels(data.images())?
            .flatten_all()?
            .to_vec1::<u8>()?;
        assert_eq!(back, pixels);
    }
    let idx = IdxArray::read(dir.path("train-labels-idx1-ubyte.gz"))?;
    assert_eq!((idx.dims, idx.data), (vec![3], vec![4, 5, 6]));
    Ok(())
}

#[test]
fn samples_are_rows_of_the_data_and_seeded() -> scoresde::Result<()> {
    let dir = TempDir::new("sample");
    fake_fashion_mnist(&dir);
    let data = ImageDataset::fashion_mnist(&dir.0, Split::Train)?;
    let batch = data.sample(16, &mut StdRng::seed_from_u64(0))?;
    assert_eq!(batch.dims(), [16, 1, 2, 3]);
    let again = data.sample(16, &mut StdRng::seed_from_u64(0))?;
    assert_eq!(
        batch.flatten_all()?.to_vec1::<f32>()?,
        again.flatten_all()?.to_vec1::<f32>()?
    );
    let images: Vec<Vec<f32>> = (0..3)
        .map(|i| data.images().get(i)?.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    for i in 0..16 {
        let row = batch.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(images.contains(&row));
    }
    Ok(())
}

fn data_error(result: scoresde::Result<impl std::fmt::Debug>) -> String {
    match result {
        Err(Error::Data(msg)) => msg,
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

#[test]
fn a_missing_directory_says_how_to_get_the_files() {
    let msg = data_error(ImageDataset::fashion_mnist("/nonexistent/fashion", Split::Train));
    assert!(msg.contains("apt-get install dataset-fashion-mnist"), "{msg}");
    assert!(msg.contains("t10k-labels-idx1-ubyte.gz"), "{msg}");
}

#[test]
fn malformed_files_are_errors_that_name_the_file() {
    let dir = TempDir::new("bad");
    let good = idx_bytes(&[2, 2, 2], &[1; 8]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 1].to_vec(), "truncated"),
        ("trailing", [good.clone(), vec![0]].concat(), "trailing"),
        ("magic", [vec![1, 0], good[2..].to_vec()].concat(), "magic"),
        (
            "type",
            [vec![0, 0, 0x0d], good[3..].to_vec()].concat(),
            "type code",
        ),
        ("header", good[..9].to_vec(), "header"),
        ("empty", Vec::new(), "magic"),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path(name);
        write(&path, &bytes, false);
        let msg = data_error(IdxArray::read(&path));
        assert!(msg.contains(expected) && msg.contains(name), "{name}: {msg}");
    }
    // A gzip stream cut short.
    let path = dir.path("cut.gz");
    write(&path, &good, true);
    let zipped = std::fs::read(&path).unwrap();
    std::fs::write(&path, &zipped[..zipped.len() / 2]).unwrap();
    let msg = data_error(IdxArray::read(&path));
    assert!(msg.contains("cut.gz"), "{msg}");
    // Labels that do not match the images.
    write(&dir.path("images"), &good, false);
    write(&dir.path("labels"), &idx_bytes(&[3], &[0, 1, 2]), false);
    let result = ImageDataset::from_idx(dir.path("images"), Some(&dir.path("labels")));
    assert!(matches!(result, Err(Error::Shape(_))));
    assert!(matches!(
        ImageDataset::from_pixels(vec![0; 7], [2, 1, 2, 2], None),
        Err(Error::Shape(_))
    ));
}
