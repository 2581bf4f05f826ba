//! Per-thread working buffers, kept from one call to the next.
//!
//! The convolutions' working buffers (im2col columns, Winograd's transformed tiles) take
//! several MB per thread and call. Allocated afresh, each was zeroed by the allocator on every
//! call, about 5 % of a VGG16 training step; kept per thread, they are zeroed once. A buffer
//! holds whatever its last user left: callers write every element before reading it. The
//! buffers only grow: each thread keeps its largest request (a few MB to tens of MB at
//! 224x224) for as long as it lives, as PyTorch's caching allocator keeps its blocks.

use std::any::Any;
use std::cell::RefCell;

use candle_core::WithDType;

thread_local! {
    static BUFFERS: RefCell<(Vec<f32>, Vec<f64>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` on `len` elements of this thread's buffer for `T`: a fresh buffer for a dtype
/// other than f32 and f64, or while the thread's own is in use (a rayon task run inside
/// another on the same thread).
pub(super) fn with<T: WithDType, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let zero = T::from_f64(0.0);
    BUFFERS.with(|cell| {
        let Ok(mut buffers) = cell.try_borrow_mut() else {
            return f(&mut vec![zero; len]);
        };
        let (a, b) = &mut *buffers;
        let own = match (a as &mut dyn Any).downcast_mut::<Vec<T>>() {
            Some(v) => Some(v),
            None => (b as &mut dyn Any).downcast_mut::<Vec<T>>(),
        };
        match own {
            Some(v) => {
                if v.len() < len {
                    v.resize(len, zero);
                }
                f(&mut v[..len])
            }
            None => f(&mut vec![zero; len]),
        }
    })
}
