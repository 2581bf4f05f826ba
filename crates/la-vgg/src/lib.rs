//! la-vgg
