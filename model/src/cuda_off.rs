//! The CUDA backend in a build without the `cuda` feature: an uninhabited type, so the
//! model's `Compute::Cuda` arm exists in every build (no `cfg` outside `cuda/`) and
//! `to_device(cuda:N)` is a typed error naming the fix.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{ModelError, Result};
use crate::kv_cache::BlockPool;
use crate::model::{Model, Sequence};
use crate::moe::{PendingExperts, Route, RoutedBatch};

/// No CUDA in this build: no value of this type exists.
#[derive(Debug)]
pub enum CudaBackend {}

/// Why nothing CUDA works in this build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error(
        "this expertmesh was built without CUDA; rebuild with \
         `cargo build --release --features cuda`"
    )]
    NotBuilt,
}

/// Device `ordinal` cannot be used: there is no CUDA in this build.
pub fn probe(_ordinal: usize) -> std::result::Result<(), CudaError> {
    Err(CudaError::NotBuilt)
}

fn unavailable() -> ModelError {
    ModelError::Device(CudaError::NotBuilt.to_string())
}

impl CudaBackend {
    pub fn new(_: &Model, _: usize, _: crate::GemmPrecision) -> Result<Self> {
        Err(unavailable())
    }

    pub fn device_name(&self) -> &str {
        match *self {}
    }

    pub fn default_pool(&self) -> Arc<BlockPool> {
        match *self {}
    }
}

impl Backend for CudaBackend {
    type Rows = std::convert::Infallible;

    fn embed(&self, _: &Model, _: &[Sequence<'_>]) -> Result<Self::Rows> {
        match *self {}
    }

    fn attention(
        &self,
        _: &Model,
        _: usize,
        _: &mut Self::Rows,
        _: &mut [Sequence<'_>],
    ) -> Result<()> {
        match *self {}
    }

    fn dense(&self, _: &Model, _: usize, _: &mut Self::Rows) -> Result<()> {
        match *self {}
    }

    fn route(&self, _: &Model, _: usize, _: &mut Self::Rows) -> Result<Vec<Route>> {
        match *self {}
    }

    fn routed_inputs(&self, _: &Self::Rows, _: &[Route], _: &[usize]) -> Result<Vec<f32>> {
        match *self {}
    }

    fn moe_finish(
        &self,
        _: &Model,
        _: usize,
        _: &mut Self::Rows,
        _: &[usize],
        _: PendingExperts,
    ) -> Result<()> {
        match *self {}
    }

    fn logits(&self, _: &Model, _: Vec<Self::Rows>, _: &[usize]) -> Result<Vec<f32>> {
        match *self {}
    }

    fn run_experts(&self, _: &Model, _: RoutedBatch) -> Result<PendingExperts> {
        match *self {}
    }

    fn new_pool(&self, _: usize, _: usize) -> Arc<BlockPool> {
        match *self {}
    }
}
