//! NCCL point-to-point links between GPU ranks (cudarc's `nccl` module): the transport of the
//! NCCL `Dispatch` in the expert-worker crate. A link is one communicator of `world` ranks,
//! made from a 128-byte unique id that rank 0 creates ([`unique_id`]) and the coordinator
//! hands to the others (`CoordinatorClient::nccl_id`). Each transfer is one grouped send and
//! receive with the peer rank; on one GPU the group has a single rank and the peer is itself.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;
use cudarc::nccl::safe::{Comm, Id};

use super::driver_error as err;
use super::CudaError;

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn nccl_error(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("NCCL: {e:?}"))
}

/// A new NCCL unique id (this process then serves as the group's bootstrap root while the
/// ranks connect).
pub fn unique_id() -> Result<[u8; ID_BYTES], CudaError> {
    super::probe(0)?;
    super::preload("nccl")?;
    let id = Id::new().map_err(nccl_error)?;
    Ok(id.internal().map(|c| c as u8))
}

/// One rank's end of a communicator, with the peer it exchanges rows with.
pub struct NcclLink {
    comm: Comm,
    stream: Arc<CudaStream>,
    peer: i32,
    /// One grouped transfer at a time: NCCL matches sends and receives by order.
    order: Mutex<()>,
    /// "cuda:N name, rank r of w".
    pub description: String,
}

impl std::fmt::Debug for NcclLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

// SAFETY: the communicator is used under `order` only, from one thread at a time; NCCL
// communicators may move between threads.
#[allow(unsafe_code)]
unsafe impl Send for NcclLink {}
#[allow(unsafe_code)]
unsafe impl Sync for NcclLink {}

impl NcclLink {
    /// Joins the communicator of `world` ranks named by `id` as `rank` on device `ordinal`;
    /// blocks until every rank has joined.
    pub fn connect(
        ordinal: usize,
        rank: usize,
        world: usize,
        peer: usize,
        id: &[u8],
    ) -> Result<Self, CudaError> {
        if id.len() != ID_BYTES || rank >= world || peer >= world {
            return Err(CudaError::Driver(format!(
                "NCCL: rank {rank} and peer {peer} of {world} with a {}-byte id",
                id.len()
            )));
        }
        let info = super::probe(ordinal)?;
        super::preload("nccl")?;
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(err)?;
        let stream = ctx.new_stream().map_err(err)?;
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (d, s) in internal.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(nccl_error)?;
        Ok(Self {
            comm,
            stream,
            peer: peer as i32,
            order: Mutex::new(()),
            description: format!("cuda:{ordinal} {}, NCCL rank {rank} of {world}", info.name),
        })
    }

    /// Sends `data` to the peer and receives as many values from it, in one NCCL group.
    pub fn transfer<T>(&self, data: &[T]) -> Result<Vec<T>, CudaError>
    where
        T: cudarc::driver::DeviceRepr
            + cudarc::driver::ValidAsZeroBits
            + cudarc::nccl::NcclType
            + Default
            + Clone,
    {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        let _order = self.order.lock().expect("NCCL order lock");
        let s = &self.stream;
        let src = s.clone_htod(data).map_err(err)?;
        let mut dst = s.alloc_zeros::<T>(data.len()).map_err(err)?;
        cudarc::nccl::result::group_start().map_err(nccl_error)?;
        let sent = self.comm.send(&src, self.peer).map_err(nccl_error);
        let received = self.comm.recv(&mut dst, self.peer).map_err(nccl_error);
        // The group is closed whatever happened inside it.
        cudarc::nccl::result::group_end().map_err(nccl_error)?;
        sent?;
        received?;
        s.clone_dtoh(&dst).map_err(err)
    }
}
