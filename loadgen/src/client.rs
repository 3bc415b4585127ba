//! A small HTTP/1.1 client for OpenAI-compatible endpoints: one request per connection,
//! streamed (server-sent events, timed token by token) or not. Failures are classified so
//! the report can count them by kind.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Responses larger than this are cut off and counted as a protocol error.
const RESPONSE_MAX_BYTES: usize = 64 << 20;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Failure {
    #[error("connect")]
    Connect,
    #[error("timeout")]
    Timeout,
    #[error("http_{0}")]
    Http(u16),
    #[error("stream_error")]
    StreamError,
    #[error("protocol")]
    Protocol,
}

/// What one request saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub started: Duration,
    pub ttft: Option<Duration>,
    /// Gaps between consecutive token events.
    pub gaps: Vec<Duration>,
    pub e2e: Duration,
    /// Token events the client counted (streaming: one per token; otherwise the usage).
    pub client_tokens: usize,
    /// `usage.completion_tokens` reported by the server, when it reported usage.
    pub usage_tokens: Option<usize>,
    /// `usage.prompt_tokens`, when reported.
    pub prompt_tokens: Option<usize>,
    /// The text generated (a multi-turn conversation sends it back as the assistant's turn).
    pub text: String,
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// Path prefix before `/v1/...` (usually empty).
    pub prefix: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

impl Endpoint {
    /// Parses `http://host:port[/prefix]`.
    pub fn parse(url: &str, api_key: Option<String>, timeout: Duration) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("`{url}`: only http:// URLs are supported"))?;
        let (address, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let prefix = prefix.strip_suffix("/v1").unwrap_or(prefix);
        if address.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        Ok(Self {
            address: address.into(),
            prefix: prefix.into(),
            api_key,
            timeout,
        })
    }

    /// GETs `path` and returns the body (for `/metrics`).
    pub async fn get(&self, path: &str) -> Result<String, Failure> {
        let work = async {
            let mut s = TcpStream::connect(&self.address)
                .await
                .map_err(|_| Failure::Connect)?;
            let head = format!(
                "GET {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.prefix, self.address
            );
            s.write_all(head.as_bytes())
                .await
                .map_err(|_| Failure::Connect)?;
            let mut raw = Vec::new();
            s.take(RESPONSE_MAX_BYTES as u64)
                .read_to_end(&mut raw)
                .await
                .map_err(|_| Failure::Protocol)?;
            match status(&raw) {
                Some(200) => {}
                Some(code) => return Err(Failure::Http(code)),
                None => return Err(Failure::Protocol),
            }
            let at = find(&raw, b"\r\n\r\n").ok_or(Failure::Protocol)? + 4;
            String::from_utf8(dechunk(&raw[at..])).map_err(|_| Failure::Protocol)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Failure::Timeout)?
    }

    /// POSTs `body` to `path` (e.g. `/v1/completions`); `t0` is when the run started.
    pub async fn send(
        &self,
        path: &str,
        body: &Value,
        stream: bool,
        t0: Instant,
    ) -> Result<Outcome, Failure> {
        let started = Instant::now();
        let mut outcome = Outcome {
            started: started - t0,
            ..Outcome::default()
        };
        let work = self.exchange(path, body, stream, started, &mut outcome);
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(())) => {
                outcome.e2e = started.elapsed();
                Ok(outcome)
            }
            Ok(Err(f)) => Err(f),
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange(
        &self,
        path: &str,
        body: &Value,
        stream: bool,
        started: Instant,
        outcome: &mut Outcome,
    ) -> Result<(), Failure> {
        let mut s = TcpStream::connect(&self.address)
            .await
            .map_err(|_| Failure::Connect)?;
        let _ = s.set_nodelay(true);
        let body = body.to_string();
        let auth = match &self.api_key {
            Some(k) => format!("Authorization: Bearer {k}\r\n"),
            None => String::new(),
        };
        let head = format!(
            "POST {}{path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.prefix, self.address, body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|_| Failure::Connect)?;
        s.write_all(body.as_bytes())
            .await
            .map_err(|_| Failure::Connect)?;
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        let mut seen = 0;
        let mut last = started;
        loop {
            let n = s.read(&mut buf).await.map_err(|_| Failure::Protocol)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if raw.len() > RESPONSE_MAX_BYTES {
                return Err(Failure::Protocol);
            }
            if stream && status(&raw).is_some_and(|c| c == 200) {
                seen = self.events(&raw, seen, started, &mut last, outcome)?;
            }
        }
        match status(&raw) {
            Some(200) => {}
            Some(code) => return Err(Failure::Http(code)),
            None => return Err(Failure::Protocol),
        }
        if !stream {
            let body_at = find(&raw, b"\r\n\r\n").ok_or(Failure::Protocol)? + 4;
            let v: Value =
                serde_json::from_slice(&dechunk(&raw[body_at..])).map_err(|_| Failure::Protocol)?;
            let n = v["usage"]["completion_tokens"].as_u64().map(|n| n as usize);
            outcome.usage_tokens = n;
            outcome.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().map(|n| n as usize);
            outcome.client_tokens = n.unwrap_or(0);
            outcome.ttft = Some(started.elapsed());
            let choice = &v["choices"][0];
            let text = choice["message"]["content"]
                .as_str()
                .or(choice["text"].as_str());
            outcome.text = text.unwrap_or_default().to_owned();
        }
        Ok(())
    }

    /// Consumes complete SSE events from `raw[seen..]`, timing token events.
    fn events(
        &self,
        raw: &[u8],
        mut seen: usize,
        started: Instant,
        last: &mut Instant,
        outcome: &mut Outcome,
    ) -> Result<usize, Failure> {
        while let Some(pos) = find(&raw[seen..], b"data: ") {
            let start = seen + pos;
            let Some(end) = find(&raw[start..], b"\n\n") else {
                break;
            };
            let event = &raw[start + 6..start + end];
            seen = start + end + 2;
            if event.starts_with(b"[DONE]") {
                continue;
            }
            let v: Value = serde_json::from_slice(event).map_err(|_| Failure::Protocol)?;
            if v.get("error").is_some() {
                return Err(Failure::StreamError);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                outcome.usage_tokens = Some(n as usize);
            }
            if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
                outcome.prompt_tokens = Some(n as usize);
            }
            let Some(choice) = v["choices"].get(0) else {
                continue;
            };
            let piece = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str());
            outcome.text.push_str(piece.unwrap_or_default());
            if !choice["finish_reason"].is_null() {
                continue;
            }
            let now = Instant::now();
            match outcome.ttft {
                None => outcome.ttft = Some(now - started),
                Some(_) => outcome.gaps.push(now - *last),
            }
            *last = now;
            outcome.client_tokens += 1;
        }
        Ok(seen)
    }
}

fn status(raw: &[u8]) -> Option<u16> {
    let line_end = find(raw, b"\r\n")?;
    let line = std::str::from_utf8(&raw[..line_end]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Undoes chunked transfer encoding when present (a body that does not parse as chunks is
/// returned as is).
fn dechunk(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return body.to_vec();
        };
        let Ok(size) = usize::from_str_radix(
            std::str::from_utf8(&rest[..line_end]).unwrap_or("x").trim(),
            16,
        ) else {
            return body.to_vec();
        };
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        if rest.len() < start + size {
            return body.to_vec();
        }
        out.extend_from_slice(&rest[start..start + size]);
        rest = &rest[(start + size + 2).min(rest.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_chunks() {
        let e = Endpoint::parse("http://127.0.0.1:8000/v1", None, Duration::from_secs(1)).unwrap();
        assert_eq!(
            (e.address.as_str(), e.prefix.as_str()),
            ("127.0.0.1:8000", "")
        );
        let e = Endpoint::parse("http://h:1/api/v1/", None, Duration::from_secs(1)).unwrap();
        assert_eq!(e.prefix, "/api");
        assert!(Endpoint::parse("https://h", None, Duration::from_secs(1)).is_err());
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert_eq!(dechunk(b"{\"a\":1}"), b"{\"a\":1}");
        assert_eq!(status(b"HTTP/1.1 429 Too Many\r\n"), Some(429));
    }
}
