//! How a batch of maps is stored: channel-first or as token rows. Its own file because both the
//! projections (`crate::projection`) and their CUDA form (`crate::cuda`) speak of it.

/// How a batch of maps is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// `[b, c, n]`: each channel's n positions contiguous.
    Channels,
    /// `[b, n, c]`: each position's c channels contiguous.
    Tokens,
}

impl Order {
    /// The dims of `batch` maps of `channels` x `positions` in this order.
    pub(crate) fn dims(self, batch: usize, channels: usize, positions: usize) -> [usize; 3] {
        match self {
            Order::Channels => [batch, channels, positions],
            Order::Tokens => [batch, positions, channels],
        }
    }

    /// (channels, positions) of a batch of maps with `dims` in this order.
    pub(crate) fn channels_positions(self, dims: &[usize]) -> (usize, usize) {
        match self {
            Order::Channels => (dims[1], dims[2]),
            Order::Tokens => (dims[2], dims[1]),
        }
    }

    /// The strides of one map's `[channels, positions]` matrix in this order.
    pub(crate) fn strides(self, channels: usize, positions: usize) -> (usize, usize) {
        match self {
            Order::Channels => (positions, 1),
            Order::Tokens => (1, channels),
        }
    }
}
