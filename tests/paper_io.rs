//! What reproducing Deveney et al. (2025) reads and writes: NumPy histograms, node grids,
//! counts from elsewhere, the paper's cost geometry, and weights in the paper's layout.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};
use scoresde::data::read_npy;
use scoresde::metrics::{Grid, Histogram};
use scoresde::score::{LogDensityModel, MlpPotential, PotentialConfig};
use scoresde::train::{deveney_names, load_foreign_weights, save_foreign_weights};
use scoresde::{Error, Result};

/// The bytes `numpy.save` writes for an array of `descr` with `shape` and raw `data`.
fn npy(version: u8, descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    let prefix = if version == 1 { 10 } else { 12 };
    while (prefix + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.extend([version, 0]);
    if version == 1 {
        bytes.extend((header.len() as u16).to_le_bytes());
    } else {
        bytes.extend((header.len() as u32).to_le_bytes());
    }
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

fn written(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("scoresde-paper-io-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("the temp dir is writable");
    path
}

#[test]
fn npy_files_of_every_supported_type_read_back_exactly() -> Result<()> {
    let dev = Device::Cpu;
    let f64s: Vec<u8> = [1.5f64, -2.0, 3.25, 1e-300, 7.0, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let x = read_npy(written("f8.npy", &npy(1, "<f8", false, "(2, 3)", &f64s)), &dev)?;
    assert_eq!(x.to_vec2::<f64>()?, [[1.5, -2.0, 3.25], [1e-300, 7.0, 8.0]]);
    // Format 2.0 (4-byte header length), 1-D shape with a trailing comma.
    let f32s: Vec<u8> = [0.5f32, -0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
    let x = read_npy(written("f4.npy", &npy(2, "<f4", false, "(2,)", &f32s)), &dev)?;
    assert_eq!((x.dtype(), x.to_vec1::<f32>()?), (DType::F32, vec![0.5, -0.25]));
    let x = read_npy(
        written("u1.npy", &npy(1, "|u1", false, "(1, 1, 3)", &[0, 128, 255])),
        &dev,
    )?;
    assert_eq!(x.dims(), [1, 1, 3]);
    assert_eq!(x.flatten_all()?.to_vec1::<u8>()?, [0, 128, 255]);
    let i64s: Vec<u8> = [-3i64, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let x = read_npy(written("i8.npy", &npy(1, "<i8", false, "(2,)", &i64s)), &dev)?;
    assert_eq!(x.to_vec1::<i64>()?, [-3, 4]);
    let x = read_npy(
        written("scalar.npy", &npy(1, "<f8", false, "()", &2.5f64.to_le_bytes())),
        &dev,
    )?;
    assert_eq!(x.to_scalar::<f64>()?, 2.5);
    Ok(())
}

#[test]
fn bad_npy_files_are_data_errors_that_name_the_file() {
    let dev = Device::Cpu;
    let eight = 1.0f64.to_le_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", npy(1, "<f8", false, "(2,)", &eight), "data bytes"),
        ("trailing", npy(1, "<f8", false, "(0,)", &eight), "data bytes"),
        ("fortran", npy(1, "<f8", true, "(1,)", &eight), "Fortran"),
        ("bigendian", npy(1, ">f8", false, "(1,)", &eight), "astype"),
        ("object", npy(1, "|O", false, "(1,)", &eight), "astype"),
        ("magic", b"PK\x03\x04 not numpy at all".to_vec(), "magic"),
        ("version", npy(9, "<f8", false, "(1,)", &eight), "version"),
        ("short", b"\x93NUMPY".to_vec(), "magic"),
        ("noshape", npy(1, "<f8", false, "[1]", &eight), "shape"),
    ];
    for (name, bytes, says) in cases {
        let path = written(&format!("{name}.npy"), &bytes);
        match read_npy(&path, &dev) {
            Err(Error::Data(msg)) => {
                assert!(msg.contains(says), "{name}: {msg}");
                assert!(msg.contains(&*path.to_string_lossy()), "{name}: {msg}");
            }
            other => panic!("{name}: expected a data error, got {other:?}"),
        }
    }
    assert!(matches!(
        read_npy("/nonexistent/x.npy", &dev),
        Err(Error::Data(_))
    ));
}

#[test]
fn node_grids_bin_to_the_nearest_node_of_linspace() -> Result<()> {
    let (lo, hi, n) = (-3.5, 3.5, 64);
    let grid = Grid::nodes(lo, hi, n)?;
    let nodes: Vec<f64> = (0..n)
        .map(|k| lo + (hi - lo) * k as f64 / (n - 1) as f64)
        .collect();
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..2000 {
        let p = [rng.random_range(-4.5..4.5), rng.random_range(-4.5..4.5)];
        let nearest = |v: f64| {
            (0..n)
                .min_by(|&a, &b| (nodes[a] - v).abs().total_cmp(&(nodes[b] - v).abs()))
                .unwrap_or(0)
        };
        let h = Histogram::new(&Tensor::new(&[p], &Device::Cpu)?, grid)?;
        let (centre, mass) = h.cells().remove(0);
        assert_eq!(mass, 1.0);
        for axis in 0..2 {
            // NumPy's argmin of the distances; ties (measure zero) aside, the same node.
            assert!((centre[axis] - nodes[nearest(p[axis])]).abs() < 1e-12, "{p:?}");
        }
    }
    assert!(Grid::nodes(1.0, 1.0, 64).is_err() && Grid::nodes(0.0, 1.0, 1).is_err());
    Ok(())
}

#[test]
fn counts_from_elsewhere_equal_binning_here_and_the_cost_grid_rescales_exactly() -> Result<()> {
    let grid = Grid::nodes(-3.5, 3.5, 64)?;
    let mut rng = StdRng::seed_from_u64(5);
    let sample = |rng: &mut StdRng, shift: f64| -> Result<Tensor> {
        let v: Vec<f64> = (0..600)
            .map(|_| rng.random_range(-3.0..3.0) * 0.7 + shift)
            .collect();
        Ok(Tensor::from_vec(v, (300, 2), &Device::Cpu)?)
    };
    let (x, y) = (sample(&mut rng, 0.0)?, sample(&mut rng, 0.4)?);
    let hx = Histogram::new(&x, grid)?;
    // The same histogram from a dense count array in C order [k0, k1].
    let mut dense = vec![0u64; 64 * 64];
    for (centre, mass) in hx.cells() {
        let k: Vec<usize> = centre
            .iter()
            .map(|c| ((c + 3.5) * 9.0).round() as usize)
            .collect();
        dense[k[0] * 64 + k[1]] = (mass * 300.0).round() as u64;
    }
    let rebuilt = Histogram::from_counts(grid, 2, &dense)?;
    assert_eq!(rebuilt.cells(), hx.cells());
    let hy = Histogram::new(&y, grid)?;
    assert_eq!(rebuilt.w2_squared(&hy)?, hx.w2_squared(&hy)?);
    // Costs on the nodes of [−4, 4]²: every squared distance, hence W2², times (8/7)².
    let costs = Grid::nodes(-4.0, 4.0, 64)?;
    let ratio = hx.with_grid(costs)?.w2_squared(&hy.with_grid(costs)?)? / hx.w2_squared(&hy)?;
    assert!((ratio - (8.0f64 / 7.0).powi(2)).abs() < 1e-12, "{ratio}");
    // Bad counts and grids.
    assert!(Histogram::from_counts(grid, 2, &dense[1..]).is_err());
    assert!(Histogram::from_counts(grid, 2, &vec![0; 64 * 64]).is_err());
    assert!(Histogram::from_counts(grid, 0, &[1]).is_err());
    assert!(Histogram::from_counts(grid, 2, &[u64::MAX; 64 * 64]).is_err());
    assert!(hx.with_grid(Grid::nodes(-4.0, 4.0, 32)?).is_err());
    Ok(())
}

#[test]
fn the_paper_layout_round_trips_and_reads_torch_weights() -> Result<()> {
    let dev = Device::Cpu;
    // A file as scripts/deveney_reference.py writes it: u(t, x) = out · softplus_β(W·[t, x] + b)
    // with weights chosen so that the value is known in closed form.
    let mut file = std::collections::HashMap::new();
    let mut put = |name: &str, t: Tensor| {
        file.insert(name.to_string(), t);
    };
    let mut first = vec![0f32; 80 * 3];
    first[0] = 1.0; // unit 0 reads t
    put("input.weight", Tensor::from_vec(first, (80, 3), &dev)?);
    put("input.bias", Tensor::zeros(80, DType::F32, &dev)?);
    let eye = Tensor::eye(80, DType::F32, &dev)?;
    for layer in ["hidden1", "hidden2"] {
        put(&format!("{layer}.weight"), eye.clone());
        put(&format!("{layer}.bias"), Tensor::zeros(80, DType::F32, &dev)?);
    }
    let mut out = vec![0f32; 80];
    out[0] = 2.0;
    put("output.weight", Tensor::from_vec(out, (1, 80), &dev)?);
    put("output.bias", Tensor::new(&[0.5f32], &dev)?);
    let path = std::env::temp_dir().join(format!("scoresde-paper-io-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&file, &path)?;

    let vars = VarMap::new();
    let u = MlpPotential::new(
        VarBuilder::from_varmap(&vars, DType::F64, &dev),
        PotentialConfig::default(),
    )?;
    load_foreign_weights(&path, &vars, &deveney_names())?;
    // t = 3: softplus_100 is the identity to 1e-130 there, three times over.
    let value = u.log_density(
        &Tensor::zeros((1, 2), DType::F64, &dev)?,
        &Tensor::new(&[3.0f64], &dev)?,
    )?;
    let sp = |v: f64| (1.0 + (100.0 * v).exp()).ln() / 100.0;
    assert!((value.to_vec1::<f64>()?[0] - (2.0 * sp(sp(sp(3.0))) + 0.5)).abs() < 1e-12);

    // Written back, the file holds the same tensors under the same names.
    let back = std::env::temp_dir().join(format!(
        "scoresde-paper-io-back-{}.safetensors",
        std::process::id()
    ));
    save_foreign_weights(&back, &vars, &deveney_names())?;
    let reread = candle_core::safetensors::load(&back, &dev)?;
    assert_eq!(reread.len(), 8);
    for (name, tensor) in &file {
        let diff = (reread[name].to_dtype(DType::F64)? - tensor.to_dtype(DType::F64)?)?
            .abs()?
            .max_all()?;
        assert_eq!(diff.to_scalar::<f64>()?, 0.0, "{name}");
    }
    // Maps that do not cover the variables exactly, and non-finite weights, write nothing.
    let names = deveney_names();
    assert!(matches!(
        save_foreign_weights(&back, &vars, &names[1..]),
        Err(Error::Checkpoint(_))
    ));
    let mut twice = names.clone();
    twice[1].1 = twice[0].1.clone();
    assert!(matches!(
        save_foreign_weights(&back, &vars, &twice),
        Err(Error::Checkpoint(_))
    ));
    vars.data()
        .lock()
        .map_err(|_| Error::InvalidParameter("lock".into()))?["output.bias"]
        .set(&Tensor::new(&[f64::NAN], &dev)?)?;
    std::fs::remove_file(&back)?;
    assert!(matches!(
        save_foreign_weights(&back, &vars, &names),
        Err(Error::Checkpoint(_))
    ));
    assert!(!back.exists());
    std::fs::remove_file(&path)?;
    Ok(())
}

#[test]
fn learning_rate_schedules_are_validated_and_followed() -> Result<()> {
    use scoresde::train::{LrDecay, TrainConfig, Trainer};
    let vars = VarMap::new();
    MlpPotential::new(
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        PotentialConfig::default(),
    )?;
    let bad = [
        LrDecay::MultiStep {
            milestones: vec![10, 10],
            gamma: 0.1,
            restart_adam: false,
        },
        LrDecay::MultiStep {
            milestones: vec![10],
            gamma: 0.0,
            restart_adam: false,
        },
        LrDecay::MultiStep {
            milestones: vec![10],
            gamma: f64::NAN,
            restart_adam: true,
        },
        LrDecay::Cosine { steps: 0, floor: 0.1 },
        LrDecay::Cosine {
            steps: 10,
            floor: 1.5,
        },
        LrDecay::Cosine {
            steps: 10,
            floor: f64::NAN,
        },
    ];
    for decay in bad {
        let config = TrainConfig {
            decay: decay.clone(),
            ..Default::default()
        };
        assert!(
            matches!(Trainer::new(&vars, config), Err(Error::InvalidParameter(_))),
            "{decay:?}"
        );
    }
    // Warmup then cosine: rising, then falling monotonically to the floor, never below it.
    let config = TrainConfig {
        warmup_steps: 10,
        decay: LrDecay::Cosine {
            steps: 90,
            floor: 0.05,
        },
        ..Default::default()
    };
    let rates: Vec<f64> = (0..200).map(|k| config.learning_rate_at(k)).collect();
    assert!(rates[..10].windows(2).all(|w| w[0] < w[1]));
    assert!(rates[9..100].windows(2).all(|w| w[0] >= w[1]));
    assert!((rates[9] - 1e-3).abs() < 1e-15);
    assert!(rates[100..].iter().all(|&r| (r - 5e-5).abs() < 1e-15));
    Ok(())
}

#[test]
fn the_share_inside_the_squares_is_exact_and_checks_its_input() -> Result<()> {
    use scoresde::data::{Checkerboard, Dataset};
    let board = Checkerboard::deveney(); // squares of side 1.5 over [−3, 3]²
                                         // A fine regular grid over the board: exactly half of it lies in filled squares.
    let n = 120;
    let h = 6.0 / n as f64;
    let grid: Vec<f64> = (0..n * n)
        .flat_map(|k| {
            [
                -3.0 + h * (0.5 + (k % n) as f64),
                -3.0 + h * (0.5 + (k / n) as f64),
            ]
        })
        .collect();
    let grid = Tensor::from_vec(grid, (n * n, 2), &Device::Cpu)?;
    assert_eq!(board.fraction_inside(&grid)?, 0.5);
    let own = board.sample(5000, &mut StdRng::seed_from_u64(1))?;
    assert_eq!(board.fraction_inside(&own)?, 1.0);
    assert_eq!(board.fraction_inside(&(own + 10.0)?)?, 0.0);
    for bad in [
        Tensor::zeros((0, 2), DType::F64, &Device::Cpu)?,
        Tensor::zeros((3, 3), DType::F64, &Device::Cpu)?,
        Tensor::zeros(3, DType::F64, &Device::Cpu)?,
        Tensor::new(&[[f64::NAN, 0.0]], &Device::Cpu)?,
    ] {
        assert!(board.fraction_inside(&bad).is_err(), "{bad:?}");
    }
    Ok(())
}
