//! The framed wire form of the plain-socket transport ([`crate::framed`]): the same
//! `DispatchRequest` / `DispatchReply` messages as gRPC, with the tensor's bytes moved out of
//! the protobuf and into the frame, so that they are written once (converted straight into
//! the frame) and read in place (a slice of the receive buffer).
//!
//! ```text
//! connection: MAGIC, then frames in both directions
//! frame:      body_len: u32 LE | header_len: u32 LE | tensor bytes | header (protobuf)
//! ```
//!
//! `body_len` counts everything after itself. The tensor bytes come first so that they sit
//! at offset 4 of the received body, aligned for reading them as f32 or bf16 in place.
//! Everything is checked before use: `body_len` against [`FRAME_BYTES_MAX`], `header_len`
//! against the body, the tensor's bytes in the frame or in the protobuf but not both, and
//! the tensor then goes through the same checks as a gRPC message ([`crate::wire`]).

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};
use expertmesh_proto::v1 as pb;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire;
use crate::{DispatchBatch, DispatchError, WireDType};

/// What a client writes first, so that a listener can tell framed dispatch from HTTP/2
/// (whose preface starts with `PRI `).
pub const MAGIC: [u8; 4] = *b"EMF1";

/// Largest frame body accepted (the gRPC message cap).
pub const FRAME_BYTES_MAX: usize = expertmesh_proto::MAX_MESSAGE_BYTES;

const PREFIX: usize = 8;

/// A frame that is not one: the connection carrying it is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {FRAME_BYTES_MAX}-byte cap")]
    TooLarge(usize),
    #[error("frame header of {header} bytes does not fit a body of {body}")]
    BadLengths { header: usize, body: usize },
    #[error("undecodable frame header: {0}")]
    Header(#[from] prost::DecodeError),
    #[error("the frame's tensor bytes are inside its header")]
    DataInHeader,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A frame ready to be written: its prefix, the tensor bytes (the very buffer the values
/// were converted into, or an f32 vector's own bytes) and the header, written with vectored
/// writes rather than first copied into one buffer.
#[derive(Debug)]
pub struct OutFrame {
    prefix: [u8; PREFIX],
    data: Bytes,
    header: Vec<u8>,
}

impl OutFrame {
    /// A frame of `data` and the message `header` that says what it is.
    pub fn new(data: Bytes, header: &impl Message) -> Result<Self, DispatchError> {
        let header = header.encode_to_vec();
        let body = 4 + data.len() + header.len();
        if body > FRAME_BYTES_MAX {
            return Err(DispatchError::BadRequest(format!(
                "a frame of {body} bytes is over the {FRAME_BYTES_MAX}-byte cap"
            )));
        }
        let mut prefix = [0u8; PREFIX];
        prefix[..4].copy_from_slice(&(body as u32).to_le_bytes());
        prefix[4..].copy_from_slice(&(header.len() as u32).to_le_bytes());
        Ok(Self {
            prefix,
            data,
            header,
        })
    }

    /// Writes the whole frame.
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let mut slices = [
            IoSlice::new(&self.prefix),
            IoSlice::new(&self.data),
            IoSlice::new(&self.header),
        ];
        let mut left = &mut slices[..];
        while !left.is_empty() {
            let n = w.write_vectored(left).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut left, n);
        }
        Ok(())
    }

    /// The frame's bytes in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.prefix[..], &self.data, &self.header].concat()
    }
}

/// The frame of a routed batch: its activations converted once (f32 ones not at all).
pub fn request(batch: DispatchBatch) -> Result<OutFrame, DispatchError> {
    let mut header = pb::DispatchRequest::from(batch);
    let data = header
        .activations
        .as_mut()
        .map(|t| std::mem::take(&mut t.data))
        .unwrap_or_default();
    OutFrame::new(data, &header)
}

/// The frame of a successful answer, in the reply dtype of the request's.
pub fn reply_ok(
    batch_id: u64,
    outputs: Vec<f32>,
    rows: usize,
    hidden: usize,
    dtype: WireDType,
) -> Result<OutFrame, DispatchError> {
    let mut header = wire::reply_ok(batch_id, outputs, rows, hidden, dtype);
    let data = match header.result.as_mut() {
        Some(pb::dispatch_reply::Result::Outputs(t)) => std::mem::take(&mut t.data),
        _ => Bytes::new(),
    };
    OutFrame::new(data, &header)
}

/// The frame of a typed failure.
pub fn reply_err(batch_id: u64, e: &DispatchError) -> OutFrame {
    OutFrame::new(Bytes::new(), &wire::reply_err(batch_id, e)).expect("an error reply is small")
}

/// One received frame: its tensor bytes and its header, both slices of one buffer.
#[derive(Debug, Clone)]
pub struct Frame {
    data: Bytes,
    header: Bytes,
}

/// Reads the next frame; `None` at a clean end of the connection (between frames). The
/// buffer is reserved at the stated length (at most [`FRAME_BYTES_MAX`]), but only the pages
/// the bytes arrive in are touched: a length that lies costs address space, not memory.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let body = u32::from_le_bytes(len) as usize;
    if body > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(body));
    }
    // Reserved address space only: pages are touched as the bytes arrive.
    let mut buf = BytesMut::with_capacity(body);
    while buf.len() < body {
        let want = (body - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    let mut body_bytes = buf.freeze();
    if body < 4 {
        return Err(FrameError::BadLengths { header: 0, body });
    }
    let header_len = u32::from_le_bytes(body_bytes[..4].try_into().expect("4 bytes")) as usize;
    if header_len > body - 4 {
        return Err(FrameError::BadLengths {
            header: header_len,
            body,
        });
    }
    let header = body_bytes.split_off(body - header_len);
    Ok(Some(Frame {
        data: body_bytes.slice(4..),
        header,
    }))
}

impl Frame {
    /// Its header as a message of another protocol carried in frames, and its tensor bytes.
    pub fn into_message<M: Message + Default>(self) -> Result<(M, Bytes), FrameError> {
        Ok((M::decode(self.header)?, self.data))
    }

    /// The request it carries, with the tensor bytes put back in place (no copy).
    pub fn into_request(self) -> Result<pb::DispatchRequest, FrameError> {
        let mut r = pb::DispatchRequest::decode(self.header)?;
        // Bytes inside the protobuf are accepted when the frame has none (the gRPC form);
        // a missing tensor is named by `DispatchBatch::try_from`'s checks.
        match r.activations.as_mut() {
            Some(t) if t.data.is_empty() => t.data = self.data,
            _ if self.data.is_empty() => {}
            _ => return Err(FrameError::DataInHeader),
        }
        Ok(r)
    }

    /// The reply it carries, likewise.
    pub fn into_reply(self) -> Result<pb::DispatchReply, FrameError> {
        let mut r = pb::DispatchReply::decode(self.header)?;
        match r.result.as_mut() {
            Some(pb::dispatch_reply::Result::Outputs(t)) if t.data.is_empty() => t.data = self.data,
            _ if self.data.is_empty() => {}
            _ => return Err(FrameError::DataInHeader),
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_reply;
    use crate::wire::tests::batch;

    async fn read_one(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
        let mut r = bytes;
        read(&mut r).await
    }

    /// A frame carries exactly what the gRPC message carries, in every dtype.
    #[tokio::test]
    async fn frames_carry_what_grpc_messages_carry() {
        for dtype in [WireDType::F32, WireDType::Bf16, WireDType::Fp8] {
            let b = batch(dtype);
            let f = request(b.clone()).unwrap().to_vec();
            let got = read_one(&f).await.unwrap().unwrap().into_request().unwrap();
            assert_eq!(got, pb::DispatchRequest::from(&b), "{dtype}");
            let out = [0.5, 1.5, -2.0, 4.0, 1e-9, 7.0];
            let f = reply_ok(9, out.to_vec(), 3, 2, dtype).unwrap().to_vec();
            let reply = read_one(&f).await.unwrap().unwrap().into_reply().unwrap();
            assert_eq!(reply, wire::reply_ok(9, out.to_vec(), 3, 2, dtype));
        }
        let e = DispatchError::WrongEpoch { current: 4 };
        let reply = read_one(&reply_err(1, &e).to_vec()).await.unwrap().unwrap();
        assert_eq!(
            decode_reply(reply.into_reply().unwrap(), 1, 2),
            Err(e.clone())
        );
        // A clean end between frames is not an error; two frames back to back both read.
        assert!(read_one(&[]).await.unwrap().is_none());
        let two = [
            request(batch(WireDType::F32)).unwrap().to_vec(),
            reply_err(2, &e).to_vec(),
        ]
        .concat();
        let mut r = &two[..];
        assert!(read(&mut r).await.unwrap().is_some());
        assert!(read(&mut r).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn hostile_frames_are_refused() {
        let over = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_one(&over).await,
            Err(FrameError::TooLarge(_))
        ));
        // Truncated: the body is shorter than it says.
        let f = request(batch(WireDType::F32)).unwrap().to_vec();
        assert!(matches!(
            read_one(&f[..f.len() - 1]).await,
            Err(FrameError::Io(_))
        ));
        // Lengths that do not fit.
        let short = [2u32.to_le_bytes().as_slice(), &[0, 0]].concat();
        assert!(matches!(
            read_one(&short).await,
            Err(FrameError::BadLengths { .. })
        ));
        let long_header = [8u32.to_le_bytes(), 5u32.to_le_bytes(), [0; 4]].concat();
        assert!(matches!(
            read_one(&long_header).await,
            Err(FrameError::BadLengths { .. })
        ));
        // A header that is not protobuf.
        let garbage = [
            6u32.to_le_bytes().as_slice(),
            &2u32.to_le_bytes(),
            &[0xff, 0xff],
        ]
        .concat();
        let frame = read_one(&garbage).await.unwrap().unwrap();
        assert!(matches!(frame.into_request(), Err(FrameError::Header(_))));
        // Bytes both inside the header and in the frame.
        let b = batch(WireDType::F32);
        let header = pb::DispatchRequest::from(&b).encode_to_vec();
        let mut both = vec![0u8; PREFIX];
        both.extend([1, 2, 3, 4]);
        both.extend(&header);
        let body = (both.len() - 4) as u32;
        both[..4].copy_from_slice(&body.to_le_bytes());
        both[4..8].copy_from_slice(&(header.len() as u32).to_le_bytes());
        let frame = read_one(&both).await.unwrap().unwrap();
        assert!(matches!(
            frame.into_request(),
            Err(FrameError::DataInHeader)
        ));
        // A request frame whose tensor disagrees with its groups is refused by the wire
        // checks, like the gRPC message.
        let mut b = batch(WireDType::F32);
        b.groups[0].rows = 2;
        let f = request(b).unwrap().to_vec();
        let r = read_one(&f).await.unwrap().unwrap().into_request().unwrap();
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::ShapeMismatch { .. })
        ));
    }
}
