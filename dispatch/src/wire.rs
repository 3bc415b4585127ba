//! Wire ↔ domain for the expert service, in one place. Everything from the wire is checked
//! before use: dtype × shape against the byte length, row counts against the tensor,
//! sizes against caps. Nothing a sender writes becomes an allocation size unchecked.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use expertmesh_model::moe::ExpertGroup;
use expertmesh_model::{fp8, kernels};
use expertmesh_proto::v1::{self as pb, dispatch_error::Kind};

use crate::{DispatchBatch, DispatchError, WireDType};

/// Longest time budget a request may ask for.
pub const TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// Trace ids one batch may name (a step's requests, at most).
pub const TRACES_MAX: usize = 256;

/// Encodes f32 values as a wire tensor of shape `[rows, hidden]`. In fp8 each row is
/// quantized with its own scale (`fp8::quantize_activations`).
pub fn encode_tensor(values: &[f32], rows: usize, hidden: usize, dtype: WireDType) -> pb::Tensor {
    encode_values(Cow::Borrowed(values), rows, hidden, dtype)
}

/// As [`encode_tensor`]; owned f32 values travel as they are (on little-endian hosts), with
/// no copy at all: the tensor's bytes are the vector's.
pub fn encode_values(
    values: Cow<'_, [f32]>,
    rows: usize,
    hidden: usize,
    dtype: WireDType,
) -> pb::Tensor {
    let mut scales = Vec::new();
    let little = cfg!(target_endian = "little");
    let data = match dtype {
        WireDType::F32 if little => match values {
            Cow::Owned(v) => Bytes::from_owner(Floats(v)),
            Cow::Borrowed(v) => Bytes::copy_from_slice(bytemuck::cast_slice(v)),
        },
        WireDType::F32 => Bytes::from(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        WireDType::Bf16 if little => Bytes::from_owner(Halves(kernels::to_bf16_vec(&values))),
        WireDType::Bf16 => Bytes::from(
            kernels::to_bf16_vec(&values)
                .iter()
                .flat_map(|h| h.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        WireDType::Fp8 => {
            let mut codes = vec![0u8; values.len()];
            // Row by row (an empty row, hidden 0, still has its scale).
            for r in 0..rows {
                let span = r * hidden..(r + 1) * hidden;
                let scale = fp8::quantize_activations(&values[span.clone()], &mut codes[span]);
                scales.extend(scale.to_le_bytes());
            }
            Bytes::from(codes)
        }
    };
    pb::Tensor {
        dtype: match dtype {
            WireDType::F32 => pb::DType::DtypeF32,
            WireDType::Bf16 => pb::DType::DtypeBf16,
            WireDType::Fp8 => pb::DType::DtypeFp8E4m3,
        } as i32,
        shape: vec![rows as u64, hidden as u64],
        data,
        scales,
    }
}

/// f32 values owned as tensor bytes.
struct Floats(Vec<f32>);

impl AsRef<[u8]> for Floats {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// bf16 bits (little-endian) owned as tensor bytes.
struct Halves(Vec<u16>);

impl AsRef<[u8]> for Halves {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Decodes a 2-D wire tensor, checking dtype, shape and byte length.
pub fn decode_tensor(t: &pb::Tensor) -> Result<(WireDType, usize, usize, Vec<f32>), DispatchError> {
    let dtype = match pb::DType::try_from(t.dtype) {
        Ok(pb::DType::DtypeF32) => WireDType::F32,
        Ok(pb::DType::DtypeBf16) => WireDType::Bf16,
        Ok(pb::DType::DtypeFp8E4m3) => WireDType::Fp8,
        _ => {
            return Err(DispatchError::BadRequest(format!(
                "unknown dtype {}",
                t.dtype
            )))
        }
    };
    let [rows, hidden] = t.shape[..] else {
        return Err(DispatchError::BadRequest(format!(
            "activations must be 2-D, got shape {:?}",
            t.shape
        )));
    };
    let expected = rows
        .checked_mul(hidden)
        .and_then(|n| n.checked_mul(dtype.size_bytes() as u64));
    if expected != Some(t.data.len() as u64) {
        return Err(DispatchError::ShapeMismatch {
            expected: vec![t.data.len() as u64 / dtype.size_bytes() as u64],
            got: t.shape.clone(),
        });
    }
    // The byte length was checked above, so these sizes are bounded by the message size.
    let (rows, hidden) = (rows as usize, hidden as usize);
    let scales = match dtype {
        WireDType::Fp8 => decode_scales(&t.scales, rows)?,
        _ if !t.scales.is_empty() => {
            return Err(DispatchError::BadRequest(
                "scales are only for fp8 tensors".into(),
            ))
        }
        _ => Vec::new(),
    };
    // Aligned little-endian bytes (the framed transport's receive buffer) are read as whole
    // values; otherwise byte by byte. Collected from slice iterators: no zeroing first.
    let little = cfg!(target_endian = "little");
    let values: Vec<f32> = match dtype {
        WireDType::F32 => match bytemuck::try_cast_slice::<u8, f32>(&t.data) {
            Ok(floats) if little => floats.to_vec(),
            _ => t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        },
        WireDType::Bf16 => match bytemuck::try_cast_slice::<u8, u16>(&t.data) {
            Ok(halves) if little => kernels::from_bf16_vec(halves),
            _ => {
                let halves: Vec<u16> = t
                    .data
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                kernels::from_bf16_vec(&halves)
            }
        },
        WireDType::Fp8 => {
            let mut values = vec![0.0f32; rows * hidden];
            for (r, scale) in scales.into_iter().enumerate() {
                let span = r * hidden..(r + 1) * hidden;
                fp8::dequantize_activations(&t.data[span.clone()], scale, &mut values[span]);
            }
            values
        }
    };
    Ok((dtype, rows, hidden, values))
}

/// An fp8 tensor's row scales: exactly `rows` little-endian f32s, each finite and positive.
fn decode_scales(bytes: &[u8], rows: usize) -> Result<Vec<f32>, DispatchError> {
    if bytes.len() != rows * 4 {
        return Err(DispatchError::BadRequest(format!(
            "an fp8 tensor of {rows} rows needs {} bytes of scales, got {}",
            rows * 4,
            bytes.len()
        )));
    }
    bytes
        .chunks_exact(4)
        .map(|b| {
            let s = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if s.is_finite() && s > 0.0 {
                Ok(s)
            } else {
                Err(DispatchError::BadRequest(format!(
                    "fp8 row scale {s} is not finite and positive"
                )))
            }
        })
        .collect()
}

impl From<&DispatchBatch> for pb::DispatchRequest {
    fn from(b: &DispatchBatch) -> Self {
        pb::DispatchRequest {
            activations: Some(encode_tensor(&b.activations, b.rows(), b.hidden, b.dtype)),
            ..request_header(b)
        }
    }
}

/// The owned form: f32 activations become the message's bytes without a copy.
impl From<DispatchBatch> for pb::DispatchRequest {
    fn from(mut b: DispatchBatch) -> Self {
        let values = std::mem::take(&mut b.activations);
        pb::DispatchRequest {
            activations: Some(encode_values(
                Cow::Owned(values),
                b.rows(),
                b.hidden,
                b.dtype,
            )),
            ..request_header(&b)
        }
    }
}

/// A batch's request without its activations.
pub fn request_header(b: &DispatchBatch) -> pb::DispatchRequest {
    pb::DispatchRequest {
        epoch: b.epoch,
        layer: b.layer,
        batch_id: b.batch_id,
        timeout_ms: b.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        groups: b
            .groups
            .iter()
            .map(|g| pb::ExpertGroup {
                expert: g.expert,
                rows: g.rows,
            })
            .collect(),
        activations: None,
        trace_ids: b
            .traces
            .iter()
            .take(TRACES_MAX)
            .map(|t| t.to_be_bytes().to_vec())
            .collect(),
    }
}

impl TryFrom<pb::DispatchRequest> for DispatchBatch {
    type Error = DispatchError;

    fn try_from(r: pb::DispatchRequest) -> Result<Self, DispatchError> {
        let t = r
            .activations
            .as_ref()
            .ok_or_else(|| DispatchError::BadRequest("missing activations".into()))?;
        let (dtype, rows, hidden, activations) = decode_tensor(t)?;
        let groups: Vec<ExpertGroup> = r
            .groups
            .iter()
            .map(|g| ExpertGroup {
                expert: g.expert,
                rows: g.rows,
            })
            .collect();
        let group_rows = groups
            .iter()
            .try_fold(0u64, |acc, g| acc.checked_add(u64::from(g.rows)));
        if group_rows != Some(rows as u64) {
            return Err(DispatchError::ShapeMismatch {
                expected: vec![group_rows.unwrap_or(u64::MAX), hidden as u64],
                got: vec![rows as u64, hidden as u64],
            });
        }
        if r.timeout_ms == 0 {
            return Err(DispatchError::BadRequest(
                "timeout_ms must be positive".into(),
            ));
        }
        if r.trace_ids.len() > TRACES_MAX {
            return Err(DispatchError::BadRequest(format!(
                "{} trace ids (at most {TRACES_MAX})",
                r.trace_ids.len()
            )));
        }
        let traces = r
            .trace_ids
            .iter()
            .map(|t| <[u8; 16]>::try_from(t.as_slice()).map(u128::from_be_bytes))
            .collect::<Result<Vec<u128>, _>>()
            .map_err(|_| DispatchError::BadRequest("a trace id is not 16 bytes".into()))?;
        Ok(DispatchBatch {
            epoch: r.epoch,
            layer: r.layer,
            batch_id: r.batch_id,
            timeout: Duration::from_millis(u64::from(r.timeout_ms)).min(TIMEOUT_MAX),
            groups,
            hidden,
            dtype,
            activations,
            traces,
        })
    }
}

/// A reply carrying outputs, in the dtype that answers the request's (`WireDType::reply`).
pub fn reply_ok(
    batch_id: u64,
    outputs: Vec<f32>,
    rows: usize,
    hidden: usize,
    dtype: WireDType,
) -> pb::DispatchReply {
    pb::DispatchReply {
        batch_id,
        result: Some(pb::dispatch_reply::Result::Outputs(encode_values(
            Cow::Owned(outputs),
            rows,
            hidden,
            dtype.reply(),
        ))),
    }
}

pub fn reply_err(batch_id: u64, e: &DispatchError) -> pb::DispatchReply {
    pb::DispatchReply {
        batch_id,
        result: Some(pb::dispatch_reply::Result::Error(pb::DispatchError {
            kind: Some(error_kind(e)),
        })),
    }
}

/// The wire form of an error's kind.
pub fn error_kind(e: &DispatchError) -> Kind {
    match e {
        DispatchError::WrongEpoch { current } => {
            Kind::WrongEpoch(pb::WrongEpoch { current: *current })
        }
        DispatchError::ExpertNotHere { layer, expert } => Kind::ExpertNotHere(pb::ExpertNotHere {
            layer: *layer,
            expert: *expert,
        }),
        DispatchError::Overloaded { queued } => {
            Kind::Overloaded(pb::Overloaded { queued: *queued })
        }
        DispatchError::ShapeMismatch { expected, got } => Kind::ShapeMismatch(pb::ShapeMismatch {
            expected: expected.clone(),
            got: got.clone(),
        }),
        DispatchError::BadRequest(reason) => Kind::BadRequest(pb::BadRequest {
            reason: reason.clone(),
        }),
        DispatchError::Unavailable(reason) => Kind::Unavailable(pb::Unavailable {
            reason: reason.clone(),
        }),
        DispatchError::DeadlineExceeded => Kind::DeadlineExceeded(pb::DeadlineExceeded {}),
    }
}

/// The outcome a reply carries, checked against the rows and hidden size asked for.
pub fn decode_reply(
    reply: pb::DispatchReply,
    rows: usize,
    hidden: usize,
) -> Result<Vec<f32>, DispatchError> {
    match reply.result {
        Some(pb::dispatch_reply::Result::Outputs(t)) => {
            let (_, r, h, values) = decode_tensor(&t)?;
            if (r, h) != (rows, hidden) {
                return Err(DispatchError::ShapeMismatch {
                    expected: vec![rows as u64, hidden as u64],
                    got: vec![r as u64, h as u64],
                });
            }
            Ok(values)
        }
        Some(pb::dispatch_reply::Result::Error(e)) => Err(match e.kind {
            Some(Kind::WrongEpoch(w)) => DispatchError::WrongEpoch { current: w.current },
            Some(Kind::ExpertNotHere(n)) => DispatchError::ExpertNotHere {
                layer: n.layer,
                expert: n.expert,
            },
            Some(Kind::Overloaded(o)) => DispatchError::Overloaded { queued: o.queued },
            Some(Kind::ShapeMismatch(s)) => DispatchError::ShapeMismatch {
                expected: s.expected,
                got: s.got,
            },
            Some(Kind::BadRequest(b)) => DispatchError::BadRequest(b.reason),
            Some(Kind::DeadlineExceeded(_)) => DispatchError::DeadlineExceeded,
            Some(Kind::Unavailable(u)) => DispatchError::Unavailable(u.reason),
            None => DispatchError::BadRequest("error reply without a kind".into()),
        }),
        None => Err(DispatchError::BadRequest("reply without a result".into())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A batch of three rows of two values in two groups (the wire and frame tests' sample).
    pub(crate) fn batch(dtype: WireDType) -> DispatchBatch {
        DispatchBatch {
            epoch: 3,
            layer: 1,
            batch_id: 9,
            timeout: Duration::from_millis(500),
            groups: vec![
                ExpertGroup { expert: 2, rows: 1 },
                ExpertGroup { expert: 5, rows: 2 },
            ],
            hidden: 2,
            dtype,
            activations: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            traces: Vec::new(),
        }
    }

    fn request() -> pb::DispatchRequest {
        pb::DispatchRequest::from(&batch(WireDType::F32))
    }

    #[test]
    fn round_trip() {
        let b = DispatchBatch::try_from(request()).unwrap();
        assert_eq!(b.rows(), 3);
        assert_eq!(b.activations, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(pb::DispatchRequest::from(&b), request());
    }

    #[test]
    fn hostile_messages_get_typed_errors() {
        let mut r = request();
        r.activations.as_mut().unwrap().shape = vec![u64::MAX, u64::MAX];
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::ShapeMismatch { .. })
        ));
        let mut r = request();
        r.activations.as_mut().unwrap().shape = vec![6];
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::BadRequest(_))
        ));
        let mut r = request();
        r.activations.as_mut().unwrap().dtype = 77;
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::BadRequest(_))
        ));
        let mut r = request();
        r.groups[0].rows = u32::MAX;
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::ShapeMismatch { .. })
        ));
        let mut r = request();
        r.activations = None;
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::BadRequest(_))
        ));
        let mut r = request();
        r.timeout_ms = 0;
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::BadRequest(_))
        ));
        let mut r = request();
        r.activations.as_mut().unwrap().data = Bytes::from_static(&[0; 7]);
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::ShapeMismatch { .. })
        ));
        // Trace ids: 16 bytes each, at most TRACES_MAX.
        let mut r = request();
        r.trace_ids = vec![vec![1; 15]];
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::BadRequest(_))
        ));
        let mut r = request();
        r.trace_ids = vec![vec![1; 16]; TRACES_MAX + 1];
        assert!(matches!(
            DispatchBatch::try_from(r),
            Err(DispatchError::BadRequest(_))
        ));
    }

    #[test]
    fn trace_ids_travel_with_the_batch() {
        let mut b = DispatchBatch::try_from(request()).unwrap();
        b.traces = vec![1, u128::MAX, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736];
        let back = DispatchBatch::try_from(pb::DispatchRequest::from(&b)).unwrap();
        assert_eq!(back.traces, b.traces);
        // More than the cap: the first TRACES_MAX travel.
        b.traces = (0..TRACES_MAX as u128 + 10).collect();
        let back = DispatchBatch::try_from(pb::DispatchRequest::from(&b)).unwrap();
        assert_eq!(back.traces.len(), TRACES_MAX);
    }

    /// fp8 rows arrive as each row's quantize-dequantize (`WireDType::carry`), in a
    /// quarter of the bytes plus a scale per row; replies to them travel as f32.
    #[test]
    fn fp8_rows_arrive_quantized() {
        let mut b = DispatchBatch::try_from(request()).unwrap();
        b.dtype = WireDType::Fp8;
        b.activations = vec![0.3, -7.0, 0.0, 0.0, 1e-3, 2.5];
        let r = pb::DispatchRequest::from(&b);
        let t = r.activations.as_ref().unwrap();
        assert_eq!((t.data.len(), t.scales.len()), (6, 12));
        let got = DispatchBatch::try_from(r.clone()).unwrap();
        let mut want = b.activations.clone();
        WireDType::Fp8.carry(&mut want, 2);
        assert_eq!(got.activations, want);
        assert_eq!(got.dtype, WireDType::Fp8);
        // The all-zero row keeps its zeros (scale = f32::EPSILON).
        assert_eq!(&got.activations[2..4], &[0.0, 0.0]);
        assert_eq!(WireDType::Fp8.row_bytes(2), 6);
        let ok = reply_ok(1, vec![0.1, 0.2], 1, 2, WireDType::Fp8);
        let Some(pb::dispatch_reply::Result::Outputs(t)) = &ok.result else {
            panic!("outputs")
        };
        assert_eq!(t.dtype, pb::DType::DtypeF32 as i32);
        assert_eq!(decode_reply(ok, 1, 2).unwrap(), vec![0.1, 0.2]);

        // Hostile scales: missing, short, zero, negative, NaN, infinite; scales on f32.
        for scales in [
            vec![],
            vec![0u8; 8],
            [1.0f32, 0.0, 1.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            [1.0f32, -1.0, 1.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            [1.0f32, f32::NAN, 1.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            [1.0f32, f32::INFINITY, 1.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ] {
            let mut bad = r.clone();
            bad.activations.as_mut().unwrap().scales = scales;
            assert!(matches!(
                DispatchBatch::try_from(bad),
                Err(DispatchError::BadRequest(_))
            ));
        }
        let mut bad = request();
        bad.activations.as_mut().unwrap().scales = vec![0; 12];
        assert!(matches!(
            DispatchBatch::try_from(bad),
            Err(DispatchError::BadRequest(_))
        ));
    }

    #[test]
    fn replies_round_trip() {
        let ok = reply_ok(1, vec![1.5, 2.5], 1, 2, WireDType::Bf16);
        assert_eq!(decode_reply(ok.clone(), 1, 2).unwrap(), vec![1.5, 2.5]);
        assert!(matches!(
            decode_reply(ok, 2, 2),
            Err(DispatchError::ShapeMismatch { .. })
        ));
        for e in [
            DispatchError::WrongEpoch { current: 4 },
            DispatchError::ExpertNotHere {
                layer: 1,
                expert: 3,
            },
            DispatchError::Overloaded { queued: 8 },
            DispatchError::DeadlineExceeded,
            DispatchError::BadRequest("x".into()),
            DispatchError::Unavailable("shutting down".into()),
        ] {
            assert_eq!(decode_reply(reply_err(1, &e), 1, 2).unwrap_err(), e);
        }
    }
}
