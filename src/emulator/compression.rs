//! HTTP compression as Salesforce's REST API does it: a request body sent with
//! `Content-Encoding: gzip` is accepted, and a response is gzipped when the client sends
//! `Accept-Encoding: gzip`. It owns the encoding only; [`super::http`] decides when to apply it.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use std::io::{Read, Write};

/// The largest body a gzipped request may expand to (a guard against compression bombs).
const MAX_INFLATED_BYTES: u64 = 256 * 1024 * 1024;

/// Responses smaller than this are sent as they are: gzip would not make them smaller.
const MIN_GZIP_BYTES: usize = 256;

/// The decompressed body of a gzipped request.
pub fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    GzDecoder::new(bytes)
        .take(MAX_INFLATED_BYTES)
        .read_to_end(&mut out)?;
    Ok(out)
}

pub fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes)?;
    enc.finish()
}

/// Does an `Accept-Encoding` value accept gzip (and not with `q=0`)?
pub fn accepts_gzip(value: &str) -> bool {
    value.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// The response gzipped, unless it is already encoded, streamed (an event stream), or small.
pub async fn gzip_response(resp: Response) -> Response {
    if resp.headers().contains_key(header::CONTENT_ENCODING) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, Body::empty());
    };
    if bytes.len() < MIN_GZIP_BYTES {
        return Response::from_parts(parts, Body::from(bytes));
    }
    match gzip(&bytes) {
        Ok(zipped) => {
            parts
                .headers
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            parts.headers.remove(header::CONTENT_LENGTH);
            parts
                .headers
                .append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
            Response::from_parts(parts, Body::from(zipped))
        }
        Err(_) => Response::from_parts(parts, Body::from(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_round_trips_and_accept_encoding_is_read_with_its_weights() {
        let text = b"SELECT Id FROM Account ".repeat(50);
        let zipped = gzip(&text).expect("gzip");
        assert!(zipped.len() < text.len());
        assert_eq!(gunzip(&zipped).expect("gunzip"), text);
        assert!(gunzip(b"not gzip").is_err());
        assert!(accepts_gzip("gzip, deflate"));
        assert!(accepts_gzip("deflate, GZIP;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("deflate, br"));
        assert!(!accepts_gzip("identity"));
    }
}
