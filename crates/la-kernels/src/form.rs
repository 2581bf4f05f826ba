//! Which form of each op runs: the fast CPU kernel or the device-generic composition of
//! Candle ops that CUDA (and Metal) builds run.
//!
//! The fast form applies only to f32/f64 tensors on the CPU; everything else takes the
//! generic form. `LA_KERNELS=generic` (or [`set_form`]) forces the generic form on the CPU
//! too, so that a test or a benchmark runs here exactly the code a GPU runs. [`with_form`]
//! overrides the choice for one closure on the calling thread, for tests that compare the
//! two forms side by side while other tests run in parallel.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Result, Tensor};

/// The form of the ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// The fast kernels where they apply: the CPU kernels for f32/f64 on the CPU and, in a
    /// build with the `cuda` feature, the CUDA kernels for f32/f64 on a CUDA device; the
    /// generic form elsewhere.
    Fast,
    /// The device-generic form everywhere.
    Generic,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::Fast => "fast",
            Form::Generic => "generic",
        }
    }
}

impl std::str::FromStr for Form {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fast" => Ok(Form::Fast),
            "generic" => Ok(Form::Generic),
            _ => Err(format!(
                "unknown kernel form {s:?} (expected fast or generic)"
            )),
        }
    }
}

/// The name of the environment variable that sets the process-wide form.
pub const ENV: &str = "LA_KERNELS";

const UNSET: u8 = 0;
const FAST: u8 = 1;
const GENERIC: u8 = 2;

static PROCESS_FORM: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    static THREAD_FORM: Cell<Option<Form>> = const { Cell::new(None) };
}

/// Sets the form for the whole process (overriding `LA_KERNELS`).
pub fn set_form(form: Form) {
    PROCESS_FORM.store(encode(form), Ordering::Relaxed);
}

fn encode(form: Form) -> u8 {
    match form {
        Form::Fast => FAST,
        Form::Generic => GENERIC,
    }
}

/// The form in force on this thread: [`with_form`]'s, else [`set_form`]'s, else
/// `LA_KERNELS`'s (fast when unset). An unknown `LA_KERNELS` value is an error, not a guess.
pub fn form() -> Result<Form> {
    if let Some(form) = THREAD_FORM.with(Cell::get) {
        return Ok(form);
    }
    match PROCESS_FORM.load(Ordering::Relaxed) {
        FAST => Ok(Form::Fast),
        GENERIC => Ok(Form::Generic),
        _ => {
            let form = match std::env::var(ENV) {
                Ok(value) => value
                    .parse()
                    .map_err(|e| candle_core::Error::Msg(format!("{ENV}={value}: {e}")))?,
                Err(_) => Form::Fast,
            };
            set_form(form);
            Ok(form)
        }
    }
}

/// Runs `f` with `form` in force on the calling thread (restored afterwards, also on a
/// panic). Ops decide their form when they are called, on the caller's thread, so the
/// kernels' own worker threads need no override.
pub fn with_form<R>(form: Form, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Form>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_FORM.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(THREAD_FORM.with(|c| c.replace(Some(form))));
    f()
}

/// Whether the fast CPU kernel runs for these tensors: the fast form is in force and every
/// tensor is f32 or f64 on the CPU, all of one dtype.
pub fn fast_path(tensors: &[&Tensor]) -> Result<bool> {
    let Some(first) = tensors.first() else {
        return Ok(false);
    };
    let dtype = first.dtype();
    Ok(form()? == Form::Fast
        && matches!(dtype, DType::F32 | DType::F64)
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype))
}

/// Whether the CUDA kernels run for these tensors: a build with the `cuda` feature, the fast
/// form in force, and every tensor non-empty, f32 or f64 on one CUDA device, all of one dtype.
/// (Empty tensors take the generic form: nothing to launch.)
pub fn cuda_path(tensors: &[&Tensor]) -> Result<bool> {
    let Some(first) = tensors.first() else {
        return Ok(false);
    };
    let dtype = first.dtype();
    Ok(cfg!(feature = "cuda")
        && form()? == Form::Fast
        && matches!(dtype, DType::F32 | DType::F64)
        && tensors.iter().all(|t| {
            t.device().is_cuda()
                && t.device().same_device(first.device())
                && t.dtype() == dtype
                && t.elem_count() > 0
        }))
}

/// [`cuda_path`] for tensors a CUDA kernel reads or writes in place: also all contiguous.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn cuda_contiguous(tensors: &[&Tensor]) -> Result<bool> {
    Ok(cuda_path(tensors)? && tensors.iter().all(|t| t.is_contiguous()))
}
