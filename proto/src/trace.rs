//! W3C trace context (`traceparent: 00-<trace id>-<parent id>-<flags>`): accepted on the HTTP
//! API (or a new trace started), carried to the attention worker in gRPC metadata, so that a
//! request's log lines in every process carry the same `trace_id`. With an OTLP exporter
//! installed (`--otlp-endpoint`), the spans a request opens in each process join that trace
//! too ([`join`]), so a collector shows them as one.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Says that this process exports spans (an OTLP exporter is installed): spans that exist
/// only for the collector are opened then, and not otherwise.
pub fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `trace` as an OpenTelemetry remote span context.
fn remote(trace: &TraceParent) -> SpanContext {
    let flags = if trace.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(
        TraceId::from_bytes(trace.trace_id.to_be_bytes()),
        SpanId::from_bytes(trace.parent_id.to_be_bytes()),
        flags,
        true,
        TraceState::default(),
    )
}

/// Makes `span` (not yet entered) a child of `trace`'s parent span for export, and returns
/// the context to send on: the same trace, with this span's id as the parent when spans are
/// exported (a fresh id otherwise). Without an exporter the span is left as it is.
pub fn join(span: &tracing::Span, trace: &TraceParent) -> TraceParent {
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote(trace)));
    let own = span.context().span().span_context().span_id();
    let id = if own == SpanId::INVALID {
        TraceParent::new_span_id()
    } else {
        u64::from_be_bytes(own.to_bytes())
    };
    trace.child(id)
}

/// A span for work that serves several requests at once (an attention worker's dispatch, an
/// expert worker's merged batch), opened by `open` only when spans are exported: in the
/// trace of the first of `traces` (its parent), linked to the others' (at most 32 links).
/// Only trace ids travel with a dispatch, so the parent span is named by the trace id's low
/// bits.
pub fn shared_span(
    traces: impl IntoIterator<Item = u128>,
    open: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    const LINKS_MAX: usize = 32;
    if !exporting() {
        return tracing::Span::none();
    }
    let span = open();
    let traces: std::collections::BTreeSet<u128> = traces.into_iter().filter(|&t| t != 0).collect();
    let context = |trace_id: u128| {
        remote(&TraceParent {
            trace_id,
            parent_id: (trace_id as u64).max(1),
            sampled: true,
        })
    };
    let mut traces = traces.into_iter();
    if let Some(first) = traces.next() {
        let parent = opentelemetry::Context::new().with_remote_span_context(context(first));
        let _ = span.set_parent(parent);
    }
    for t in traces.take(LINKS_MAX) {
        span.add_link(context(t));
    }
    span
}

/// The metadata key (and HTTP header) that carries a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A request's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    /// The id of the span that sent it (this hop's parent).
    pub parent_id: u64,
    pub sampled: bool,
}

/// Random bits from the standard library's randomly keyed hasher (enough for ids that only
/// need to be distinct, not secret).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}

impl TraceParent {
    /// A new trace, sampled.
    pub fn start() -> Self {
        let trace_id = (u128::from(random_u64()) << 64) | u128::from(random_u64());
        Self {
            trace_id: trace_id.max(1),
            parent_id: random_u64().max(1),
            sampled: true,
        }
    }

    /// Parses a `traceparent` value; `None` for anything W3C says to ignore (another
    /// length, upper-case or non-hex digits, version `ff`, all-zero ids).
    pub fn parse(value: &str) -> Option<Self> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        let [version, trace, parent, flags, ..] = parts[..] else {
            return None;
        };
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(parent, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        if version == "00" && parts.len() != 4 {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|&t| t != 0)?;
        let parent_id = u64::from_str_radix(parent, 16).ok().filter(|&p| p != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context to send on: same trace, `span_id` as the parent.
    pub fn child(&self, span_id: u64) -> Self {
        Self {
            parent_id: span_id,
            ..*self
        }
    }

    /// A new span id for this hop.
    pub fn new_span_id() -> u64 {
        random_u64().max(1)
    }

    /// The trace id as W3C writes it (32 lower-case hex digits).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.parent_id,
            u8::from(self.sampled)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_print_as_w3c_says() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(v).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.sampled);
        assert_eq!(t.to_string(), v);
        assert_eq!(
            t.child(7).to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
        let a = TraceParent::start();
        let b = TraceParent::start();
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(TraceParent::parse(&a.to_string()), Some(a));
    }
}
