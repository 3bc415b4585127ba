//! Where every role's lines go: `tracing` to stderr, filtered by `RUST_LOG` (`info` when it
//! is unset), as text or, with `--log-format json`, one JSON object per line (the event's
//! fields flattened, with its span's: a request's `trace_id` among them). With
//! `--otlp-endpoint URL` the spans are exported too, over OTLP/gRPC to a collector (Jaeger,
//! Tempo, the OpenTelemetry Collector), each process under its own `service.name`. `up`
//! passes both down to the processes it starts.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// What this process was told about its telemetry (what a local cluster passes on).
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub format: LogFormat,
    pub otlp_endpoint: Option<String>,
}

impl Telemetry {
    /// The flags that give a child process the same.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--log-format".to_owned(), self.format.to_string()];
        if let Some(endpoint) = &self.otlp_endpoint {
            args.extend(["--otlp-endpoint".to_owned(), endpoint.clone()]);
        }
        args
    }
}

static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

/// The exporter's provider and the runtime its gRPC channel lives on.
struct Exporter {
    provider: SdkTracerProvider,
    _runtime: tokio::runtime::Runtime,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// This process's telemetry settings.
pub fn telemetry() -> Telemetry {
    TELEMETRY.get().cloned().unwrap_or_default()
}

/// How long spans wait to be sent in a batch.
const EXPORT_EVERY: Duration = Duration::from_millis(500);

/// An OTLP/gRPC span exporter to `endpoint` for the service `service`, batching on its own
/// thread. Its tonic channel is made (lazily connecting) on a small runtime of its own, which
/// stays alive as long as the process, so export works whatever runtime the role runs on.
fn exporter(endpoint: &str, service: &str) -> anyhow::Result<Exporter> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp")
        .enable_all()
        .build()?;
    let spans = {
        let _inside = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()?
    };
    let batches = BatchSpanProcessor::builder(spans)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_EVERY)
                .with_max_queue_size(8192)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    Ok(Exporter {
        provider,
        _runtime: runtime,
    })
}

/// Installs the subscriber for this process, named `service` (`expertmesh-<role>`) to a
/// collector.
pub fn init(telemetry: Telemetry, service: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let lines = match telemetry.format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let spans = match &telemetry.otlp_endpoint {
        Some(endpoint) => {
            let exporter = exporter(endpoint, service)?;
            let tracer = exporter.provider.tracer("expertmesh");
            let _ = EXPORTER.set(exporter);
            expertmesh_proto::trace::set_exporting();
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        None => None,
    };
    let _ = TELEMETRY.set(telemetry);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(spans)
        .try_init();
    Ok(())
}

/// Sends the spans not yet exported (before the process exits).
pub fn flush() {
    if let Some(exporter) = EXPORTER.get() {
        let _ = exporter.provider.force_flush();
    }
}
