//! Every op's generic form (what CUDA builds run) against its fast CPU form, values and
//! gradients, in f64 (1e-10) and f32 (1e-4), on the device `LA_TEST_DEVICE` names (the CPU
//! by default).

use candle_core::DType;
use la_kernels::parity::{compare_all, compare_updates, test_device};
use la_kernels::Form;

fn check(dtype: DType) {
    let device = test_device().unwrap();
    let mut comparisons = compare_all(&device, dtype).unwrap();
    assert!(comparisons.len() >= 20, "{} cases", comparisons.len());
    // The in-place updates in the device's own kernels (the CPU's against themselves here).
    comparisons.extend(compare_updates(Form::Fast, &device, dtype).unwrap());
    let failed: Vec<_> = comparisons.iter().filter(|c| !c.passed()).collect();
    assert!(failed.is_empty(), "{dtype:?}: {failed:#?}");
}

#[test]
fn generic_forms_match_the_fast_kernels_in_f64() {
    check(DType::F64);
}

#[test]
fn generic_forms_match_the_fast_kernels_in_f32() {
    check(DType::F32);
}
