//! `seeded_var_builder`: the initializations candle-nn asks for, drawn from a seeded
//! generator, into the caller's `VarMap`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{linear, Init, VarBuilder, VarMap};
use scoresde::random::seeded_var_builder;

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn mean_and_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn linear_layers_get_candle_nns_initialization_from_the_seed() {
    let vars = VarMap::new();
    let layer = linear(256, 512, seeded_var_builder(&vars, 3, DType::F32, &Device::Cpu)).unwrap();
    // Weights: Kaiming normal, fan-in 256, ReLU gain √2, so std √2/16. With 131,072 draws
    // the sample std is within 0.2% (one standard error) of it; allow 1%.
    let (mean, std) = mean_and_std(&values(layer.weight()));
    let want = 2f64.sqrt() / 16.0;
    assert!((std / want - 1.0).abs() < 0.01, "weight std {std} vs {want}");
    assert!(
        mean.abs() < 4.0 * want / (131_072f64).sqrt(),
        "weight mean {mean}"
    );
    // Biases: uniform on ±1/√256: inside the bounds, variance bound²/3 (within 15% for 512
    // draws: the relative standard error of a uniform variance estimate is ~5.6% here).
    let bias = values(layer.bias().unwrap());
    let bound = 1.0 / 16.0;
    assert!(bias.iter().all(|b| b.abs() < bound));
    let (_, std) = mean_and_std(&bias);
    assert!(
        (std * std / (bound * bound / 3.0) - 1.0).abs() < 0.15,
        "bias std {std}"
    );
    // They are the map's variables, so the trainer trains them.
    assert_eq!(vars.all_vars().len(), 2);
}

#[test]
fn every_init_hint_is_followed() {
    let vars = VarMap::new();
    let vb = seeded_var_builder(&vars, 0, DType::F64, &Device::Cpu);
    let constant = values(&vb.get_with_hints(10, "c", Init::Const(0.25)).unwrap());
    assert_eq!(constant, vec![0.25; 10]);
    let u = values(
        &vb.get_with_hints(20_000, "u", Init::Uniform { lo: 2.0, up: 3.0 })
            .unwrap(),
    );
    assert!(u.iter().all(|v| (2.0..3.0).contains(v)));
    let (mean, _) = mean_and_std(&u);
    assert!((mean - 2.5).abs() < 4.0 * (1.0 / 12f64).sqrt() / (20_000f64).sqrt());
    let n = values(
        &vb.get_with_hints(
            20_000,
            "n",
            Init::Randn {
                mean: -1.0,
                stdev: 0.5,
            },
        )
        .unwrap(),
    );
    let (mean, std) = mean_and_std(&n);
    assert!((mean + 1.0).abs() < 4.0 * 0.5 / (20_000f64).sqrt(), "{mean}");
    assert!((std - 0.5).abs() < 0.02, "{std}");
}

#[test]
fn existing_variables_are_kept_and_checked() {
    let vars = VarMap::new();
    // A variable that is already there (as after loading a checkpoint) is not redrawn.
    let loaded = VarBuilder::from_varmap(&vars, DType::F64, &Device::Cpu)
        .get_with_hints(3, "w", Init::Const(7.0))
        .unwrap();
    let vb = seeded_var_builder(&vars, 0, DType::F64, &Device::Cpu);
    assert!(vb.contains_tensor("w"));
    let again = vb
        .get_with_hints(
            3,
            "w",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )
        .unwrap();
    assert_eq!(again.id(), loaded.id());
    assert_eq!(values(&again), vec![7.0; 3]);
    // ... and a shape that does not match it is an error.
    assert!(vb.get_with_hints(4, "w", Init::Const(0.0)).is_err());
}

#[test]
fn impossible_hints_are_errors_not_panics() {
    let vars = VarMap::new();
    let vb = seeded_var_builder(&vars, 0, DType::F32, &Device::Cpu);
    assert!(vb
        .get_with_hints(3, "a", Init::Uniform { lo: 1.0, up: 0.0 })
        .is_err());
    assert!(vb
        .get_with_hints(
            3,
            "b",
            Init::Randn {
                mean: 0.0,
                stdev: -1.0
            }
        )
        .is_err());
    assert!(vb
        .get_with_hints(
            3,
            "c",
            Init::Randn {
                mean: f64::NAN,
                stdev: 1.0
            }
        )
        .is_err());
    // Nothing half-made was left behind.
    assert!(vars.all_vars().is_empty());
}
