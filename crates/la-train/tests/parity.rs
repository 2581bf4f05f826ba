//! One SGD step of VGG16_bn (width 0.25) with each attention kind: the generic form (what a
//! CUDA build runs, on the device `LA_TEST_DEVICE` names, the CPU by default) against the
//! fast CPU form.
//!
//! In f64 the loss, every gradient and every updated parameter agree within 1e-10 (seen:
//! 1e-13). In f32 each form's gradients are within 1e-4 of the f64 step (seen: 1e-5, and
//! 4e-5 and 6e-5 for relu-linear, whose tiny denominators make it the worst conditioned), so
//! the two forms within 2e-4 of each other, and the losses within 1e-4. The generic
//! BatchNorm sums in f64 for this: with Candle's f32 sums, block 1's gradients were 1.4 %
//! away from the f64 step with efficient attention.

use candle_core::DType;
use la_attention::{AttentionConfig, AttentionKind};
use la_kernels::parity::test_device;
use la_train::parity::compare_training_step;
use la_vgg::{HeadConfig, VggConfig};

fn check(attention: Option<AttentionKind>) {
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
    let s = &f32_step;
    assert!(
        s.fast_error_vs_f64 <= 1e-4 && s.generic_error_vs_f64 <= 1e-4 && s.grad_error <= 2e-4,
        "{attention:?} in f32: {s:#?}"
    );
}

#[test]
fn a_plain_step_is_the_same_in_both_forms() {
    check(None);
}

#[test]
fn a_softmax_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::Softmax));
}

#[test]
fn a_linear_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::Linear));
}

#[test]
fn an_efficient_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::Efficient));
}

#[test]
fn a_relu_linear_attention_step_is_the_same_in_both_forms() {
    check(Some(AttentionKind::ReluLinear));
}
