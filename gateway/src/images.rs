//! A chat request's images: each `image_url` resolved to bytes — a `data:` URL decoded, an
//! `http://` URL fetched when `allow_image_urls` is on — and decoded once under the image
//! bounds (off the async threads; not resized: the worker makes the tiles) to refuse a bad image with a 400 and to learn its tile
//! grid, which the prompt expansion needs. The bytes go on to the attention worker as they
//! are; it preprocesses them again and runs the vision tower.
//!
//! Fetching guards against SSRF and slow or huge answers: it is off by default; only
//! `http://` is fetched (this build has no TLS client, so `https://` is refused with a
//! clear error); redirects are not followed; the answer must arrive within
//! `image_fetch_timeout_ms` and stay under the byte cap while it streams.

use std::time::Duration;

use base64::Engine as _;
use expertmesh_model::vision::check;
use expertmesh_model::{ImageError, ImageLimits, ProcessorConfig};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// How the gateway takes images.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// Fetch `http://` image URLs (off: only `data:` URLs are taken, so a request cannot
    /// make the gateway reach into its network).
    pub allow_image_urls: bool,
    /// A fetch must finish within this long, in ms.
    pub image_fetch_timeout_ms: u64,
    /// Bounds on a request's images (the attention workers apply the same).
    pub limits: ImageLimits,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            allow_image_urls: false,
            image_fetch_timeout_ms: 10_000,
            limits: ImageLimits::default(),
        }
    }
}

/// One image of a request, checked: its encoded bytes and its tile grid.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedImage {
    pub bytes: Vec<u8>,
    pub grid: (usize, usize),
}

/// A bad image as the client sees it.
pub fn image_error(e: ImageError) -> ApiError {
    ApiError::bad(e.to_string(), "messages")
}

/// Resolves, fetches and checks every image of a request, in order.
pub async fn load(
    urls: &[String],
    config: &ImageConfig,
    processor: &ProcessorConfig,
) -> Result<Vec<LoadedImage>, ApiError> {
    let limits = config.limits;
    if urls.len() > limits.images_max {
        return Err(image_error(ImageError::TooMany {
            count: urls.len(),
            max: limits.images_max,
        }));
    }
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let bytes = resolve(url, config).await?;
        let processor = processor.clone();
        let (bytes, grid) = tokio::task::spawn_blocking(move || {
            check(&bytes, &processor, &limits).map(|grid| (bytes, grid))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("decoding an image: {e}")))?
        .map_err(image_error)?;
        out.push(LoadedImage { bytes, grid });
    }
    Ok(out)
}

/// The bytes behind one `image_url`.
async fn resolve(url: &str, config: &ImageConfig) -> Result<Vec<u8>, ApiError> {
    let bad = |m: String| ApiError::bad(m, "messages");
    if let Some(rest) = url.strip_prefix("data:") {
        return decode_data_url(rest, config.limits.image_bytes_max);
    }
    let scheme = url
        .split_once(':')
        .map_or("", |(s, _)| s)
        .to_ascii_lowercase();
    match scheme.as_str() {
        "http" | "https" if !config.allow_image_urls => Err(bad(
            "fetching image URLs is off on this server: send the image as a data: URL \
             (base64), or start the gateway with --allow-image-urls"
                .into(),
        )),
        "http" => fetch(url, config).await,
        "https" => Err(bad(
            "https image URLs cannot be fetched (this build has no TLS client): send the \
             image as a data: URL"
                .into(),
        )),
        _ => Err(bad(format!(
            "image_url must be a data: or http(s): URL, not `{}`",
            url.chars().take(40).collect::<String>()
        ))),
    }
}

/// `data:[<media type>];base64,<data>`, with the byte cap checked before decoding.
fn decode_data_url(rest: &str, bytes_max: usize) -> Result<Vec<u8>, ApiError> {
    let bad = |m: &str| ApiError::bad(m, "messages");
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| bad("a data: URL needs a comma before its data"))?;
    if !meta.ends_with(";base64") {
        return Err(bad(
            "image data: URLs must be base64 (data:image/png;base64,...)",
        ));
    }
    let data = data.trim();
    let decoded_len = data.len() / 4 * 3;
    if decoded_len > bytes_max + 3 {
        return Err(image_error(ImageError::TooLarge {
            bytes: decoded_len,
            max: bytes_max,
        }));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| bad(&format!("the image's base64 data is invalid: {e}")))
}

/// GETs an `http://` URL: no redirects, a deadline, the byte cap while streaming.
async fn fetch(url: &str, config: &ImageConfig) -> Result<Vec<u8>, ApiError> {
    let bad = |m: String| ApiError::bad(m, "messages");
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| bad(format!("the image URL is invalid: {e}")))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let max = config.limits.image_bytes_max;
    let get = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| bad(format!("fetching the image failed: {e}")))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(bad(format!(
                "the image URL answered with a redirect ({status}); redirects are not followed"
            )));
        }
        if !status.is_success() {
            return Err(bad(format!("the image URL answered {status}")));
        }
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| bad(format!("fetching the image failed: {e}")))?;
            if let Some(chunk) = frame.data_ref() {
                if bytes.len() + chunk.len() > max {
                    return Err(image_error(ImageError::TooLarge {
                        bytes: bytes.len() + chunk.len(),
                        max,
                    }));
                }
                bytes.extend_from_slice(chunk);
            }
        }
        Ok(bytes)
    };
    tokio::time::timeout(Duration::from_millis(config.image_fetch_timeout_ms), get)
        .await
        .map_err(|_| {
            bad(format!(
                "fetching the image took longer than {} ms",
                config.image_fetch_timeout_ms
            ))
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls() {
        let ok = decode_data_url("image/png;base64,aGVsbG8=", 100).unwrap();
        assert_eq!(ok, b"hello");
        for bad in [
            "image/png;base64",
            "image/png,hello",
            "image/png;base64,@@@@",
        ] {
            assert!(decode_data_url(bad, 100).is_err(), "{bad}");
        }
        let big = format!("image/png;base64,{}", "A".repeat(400));
        assert!(decode_data_url(&big, 100).is_err());
    }

    #[tokio::test]
    async fn urls_are_refused_unless_allowed() {
        let config = ImageConfig::default();
        for url in [
            "http://127.0.0.1:1/x.png",
            "https://example.com/x.png",
            "file:///etc/passwd",
        ] {
            let e = resolve(url, &config).await.unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{url}");
        }
        let allowed = ImageConfig {
            allow_image_urls: true,
            image_fetch_timeout_ms: 2000,
            ..ImageConfig::default()
        };
        let e = resolve("ftp://x/y", &allowed).await.unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
    }
}
