//! The 3x3 convolution layer (stride 1, padding 1: the only conv VGG has), a drop-in for
//! candle-nn's `Conv2d` with that config, running `la_kernels::conv::conv3x3`.

use candle_core::{Module, Result, Tensor};

/// A 3x3 convolution with weights `[c_out, c_in, 3, 3]` and an optional bias `[c_out]`.
#[derive(Clone, Debug)]
pub struct Conv3x3 {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Conv3x3 {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `relu(conv(x))`, the ReLU fused into the conv on the CPU.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        la_kernels::conv::conv3x3(x, &self.weight, self.bias.as_ref(), true)
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        la_kernels::conv::conv3x3(x, &self.weight, self.bias.as_ref(), false)
    }
}
