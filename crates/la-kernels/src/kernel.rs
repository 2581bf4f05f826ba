//! The one bridge between this crate's ops and Candle's custom-op traits.
//!
//! Candle has a trait per input count (`CustomOp1`, `CustomOp2`, `CustomOp3`), each with
//! long signatures over storages and layouts. Every op here instead implements [`Kernel`]
//! for its input count, with the inputs as one array, and [`apply`] hands it to Candle
//! through the matching trait. The fused CPU kernels implement the CPU forward; the
//! precomputed ops (`crate::precomputed`) also the CUDA one.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// One input of a forward pass: its storage and layout.
pub(crate) type Input<'a, S> = (&'a S, &'a Layout);

/// What a backward pass gets: the op's inputs, its output and the output's gradient.
pub(crate) struct Grad<'a, const N: usize> {
    pub inputs: [&'a Tensor; N],
    pub output: &'a Tensor,
    pub grad: &'a Tensor,
}

/// An op with `N` inputs: its forward on CPU storage (and, optionally, CUDA storage) and
/// its backward as tensor operations, one gradient per input.
pub(crate) trait Kernel<const N: usize>: Send + Sync {
    fn cpu_forward(&self, inputs: [Input<CpuStorage>; N]) -> Result<(CpuStorage, Shape)>;

    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        _inputs: [Input<candle_core::CudaStorage>; N],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        candle_core::bail!("this op has no CUDA kernel: its generic form runs on CUDA")
    }

    fn backward(&self, g: Grad<N>) -> Result<[Option<Tensor>; N]>;
}

/// A [`Kernel`] under its name, as Candle's custom op.
pub(crate) struct Op<K> {
    name: &'static str,
    kernel: K,
}

/// Runs `kernel` on `inputs` as the op `name`, recorded for the backward pass.
pub(crate) fn apply<K, const N: usize>(
    name: &'static str,
    inputs: [&Tensor; N],
    kernel: K,
) -> Result<Tensor>
where
    Op<K>: Applied<N>,
{
    Op { name, kernel }.applied(inputs)
}

/// How an [`Op`] of `N` inputs reaches Candle.
pub(crate) trait Applied<const N: usize> {
    fn applied(self, inputs: [&Tensor; N]) -> Result<Tensor>;
}

impl<K: Kernel<1> + 'static> Applied<1> for Op<K> {
    fn applied(self, [x]: [&Tensor; 1]) -> Result<Tensor> {
        x.apply_op1(self)
    }
}

impl<K: Kernel<2> + 'static> Applied<2> for Op<K> {
    fn applied(self, [a, b]: [&Tensor; 2]) -> Result<Tensor> {
        a.apply_op2(b, self)
    }
}

impl<K: Kernel<3> + 'static> Applied<3> for Op<K> {
    fn applied(self, [a, b, c]: [&Tensor; 3]) -> Result<Tensor> {
        a.apply_op3(b, c, self)
    }
}

impl<K: Kernel<1>> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.kernel.cpu_forward([(s, l)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.kernel.cuda_forward([(s, l)])
    }

    fn bwd(&self, x: &Tensor, output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [gx] = self.kernel.backward(Grad {
            inputs: [x],
            output,
            grad,
        })?;
        Ok(gx)
    }
}

impl<K: Kernel<2>> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.kernel.cpu_forward([(s1, l1), (s2, l2)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.kernel.cuda_forward([(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.kernel.backward(Grad {
            inputs: [a, b],
            output,
            grad,
        })?;
        Ok((ga, gb))
    }
}

impl<K: Kernel<3>> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.kernel.cpu_forward([(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.kernel.cuda_forward([(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.kernel.backward(Grad {
            inputs: [a, b, c],
            output,
            grad,
        })?;
        Ok((ga, gb, gc))
    }
}
