//! The weights' moving average: timm's update and warm-up, and a run that keeps one.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use la_train::ema::{EmaConfig, ModelEma};

#[test]
fn the_average_follows_timms_update_and_warmup() {
    // timm ModelEmaV3.get_decay: 1 - (1 + step / gamma) ** -power, gamma 1, power 2/3,
    // clamped to [0, decay].
    let warm = EmaConfig {
        decay: 0.999,
        warmup: true,
    };
    for step in [0usize, 1, 9, 99, 10_000_000] {
        let timm = (1.0 - (1.0 + step as f64).powf(-2.0 / 3.0)).clamp(0.0, 0.999);
        assert!((warm.decay_at(step) - timm).abs() < 1e-15, "step {step}");
    }
    let plain = EmaConfig {
        decay: 0.9,
        warmup: false,
    };
    assert_eq!(plain.decay_at(0), 0.9);

    // ema <- d ema + (1 - d) w, against the same recurrence written out.
    let varmap = VarMap::new();
    let w = varmap
        .get((3,), "w", Init::Const(1.0), DType::F32, &Device::Cpu)
        .unwrap();
    let mut ema = ModelEma::new(plain, &varmap, HashMap::new()).unwrap();
    let mut expected = 1.0f64;
    for (step, value) in [2.0f32, -1.0, 5.0].into_iter().enumerate() {
        let var = varmap.data().lock().unwrap()["w"].clone();
        var.set(&Tensor::new(&[value; 3], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&varmap, step).unwrap();
        expected = 0.9 * expected + 0.1 * value as f64;
    }
    let got = la_testing::values(&ema.tensors()["w"]);
    assert!(
        got.iter().all(|v| (v - expected).abs() < 1e-6),
        "{got:?} vs {expected}"
    );
    // The model's own weights are untouched.
    assert_eq!(la_testing::values(&w)[0], 5.0);
}
