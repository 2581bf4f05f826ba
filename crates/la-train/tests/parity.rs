//! One SGD step of VGG16_bn (width 0.25) with each attention kind: the generic form (what a
//! CUDA build runs, on the device `LA_TEST_DEVICE` names, the CPU by default) against the
//! fast CPU form.
//!
//! In f64 the loss, every gradient and every updated parameter agree within 1e-10 (seen:
//! 1e-13). In f32 the loss agrees within 1e-4 for every kind, and so do the gradients for
//! none, softmax and linear; with `efficient` and `relu-linear` a few max-pool windows and
//! ReLUs sit so close to a tie that the two forms' f32 roundings choose differently (seen:
//! 6e-3 and 1.4e-2 of the largest gradient), which moves whole gradient entries. The f64
//! agreement shows that it is rounding, not a difference of the two forms.

use candle_core::DType;
use la_attention::{AttentionConfig, AttentionKind};
use la_kernels::parity::test_device;
use la_train::parity::compare_training_step;
use la_vgg::{HeadConfig, VggConfig};

fn check(attention: Option<AttentionKind>, f32_grad_tolerance: f64) {
    let config = VggConfig::vgg(16, 10)
        .unwrap()
        .with_batch_norm(true)
        .with_head(HeadConfig::cifar(None))
        .with_width(0.25)
        .unwrap()
        .with_attention(attention.map(AttentionConfig::new));
    let device = test_device().unwrap();
    let f64_step = compare_training_step(&config, 4, 32, DType::F64, &device).unwrap();
    assert!(
        f64_step.within(1e-10),
        "{attention:?} in f64: {f64_step:#?}"
    );
    assert!(
        f64_step.loss_fast.is_finite() && f64_step.loss_fast > 0.5,
        "{f64_step:#?}"
    );
    let f32_step = compare_training_step(&config, 4, 32, DType::F32, &device).unwrap();
    assert!(
        f32_step.loss_error <= 1e-4,
        "{attention:?} in f32: {f32_step:#?}"
    );
    assert!(
        f32_step.grad_error <= f32_grad_tolerance,
        "{attention:?} in f32: {f32_step:#?}"
    );
}

#[test]
fn a_plain_step_is_the_same_in_both_forms() {
    check(None, 1e-4);
}

#[test]
fn a_softmax_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::Softmax), 1e-4);
}

#[test]
fn a_linear_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::Linear), 1e-4);
}

#[test]
fn an_efficient_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::Efficient), 5e-2);
}

#[test]
fn a_relu_linear_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::ReluLinear), 5e-2);
}
