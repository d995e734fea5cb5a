//! Reading an upload's body within bounds: every byte counts.
//!
//! [`Counted`] wraps the raw request payload before anything parses it, so the multipart
//! preamble, each part's headers, the delimiters and the epilogue count against
//! `server.max_upload_bytes` like the photos do. Past the limit nothing more is kept; past
//! [`DRAIN_FACTOR`] times it reading stops. For a multipart body it also scans the regions
//! the multipart parser would buffer whole (the preamble, and a part's header block until its
//! blank line) and stops any of them past [`REGION_CAP`]: the parser keeps those in memory
//! until they end, and a real client sends a few hundred bytes there.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use bytes::Bytes;
use futures::Stream;

/// A body past the limit is still read (and thrown away) up to this many times the limit,
/// so the client hears the 413 instead of a reset connection; past that the connection is
/// dropped. Memory stays at the limit either way.
pub const DRAIN_FACTOR: u64 = 4;

/// Most bytes of a multipart preamble, of one part's header block, or of the epilogue.
pub const REGION_CAP: usize = 16 * 1024;

/// Why reading a body stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// More than `DRAIN_FACTOR` times the limit.
    TooLarge,
    /// A preamble, part header block or epilogue over [`REGION_CAP`].
    RegionTooLarge,
}

/// What the reader of a [`Counted`] body sees of it.
#[derive(Clone, Default)]
pub struct Tally {
    total: Rc<Cell<u64>>,
    violation: Rc<Cell<Option<Violation>>>,
}

impl Tally {
    /// Raw bytes received so far.
    pub fn total(&self) -> u64 {
        self.total.get()
    }

    pub fn violation(&self) -> Option<Violation> {
        self.violation.get()
    }
}

/// The raw payload, counted (and scanned, for a multipart body).
pub struct Counted<S> {
    inner: S,
    tally: Tally,
    hard_limit: u64,
    scanner: Option<Scanner>,
}

impl<S> Counted<S> {
    /// `boundary`: the multipart boundary, when the body is a form.
    pub fn new(inner: S, limit: u64, boundary: Option<&str>) -> (Self, Tally) {
        let tally = Tally::default();
        let counted = Counted {
            inner,
            tally: tally.clone(),
            hard_limit: limit.saturating_mul(DRAIN_FACTOR),
            scanner: boundary.map(Scanner::new),
        };
        (counted, tally)
    }

    fn stop(&self, v: Violation) -> Poll<Option<Result<Bytes, PayloadError>>> {
        self.tally.violation.set(Some(v));
        Poll::Ready(Some(Err(PayloadError::Overflow)))
    }
}

impl<S> Stream for Counted<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(v) = self.tally.violation() {
            return self.stop(v);
        }
        let chunk = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => chunk,
            other => return other,
        };
        let total = self.tally.total.get() + chunk.len() as u64;
        self.tally.total.set(total);
        if total > self.hard_limit {
            return self.stop(Violation::TooLarge);
        }
        if let Some(s) = self.scanner.as_mut()
            && !s.feed(&chunk)
        {
            return self.stop(Violation::RegionTooLarge);
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    /// Before the first delimiter.
    Preamble,
    /// After a delimiter, until the blank line that ends the part's headers (or, after the
    /// closing delimiter, the epilogue).
    Headers,
    /// A part's content, until the next delimiter.
    Content,
}

/// Follows a multipart body's delimiters across chunks to measure the regions the parser
/// buffers whole.
struct Scanner {
    /// `\r\n--boundary`; the first delimiter may come without the line break.
    delimiter: Vec<u8>,
    region: Region,
    /// Bytes of the current preamble or header region so far.
    run: usize,
    /// The end of the previous chunk, where a delimiter may have begun.
    carry: Vec<u8>,
}

impl Scanner {
    fn new(boundary: &str) -> Self {
        Scanner {
            delimiter: [b"\r\n--".as_slice(), boundary.as_bytes()].concat(),
            region: Region::Preamble,
            run: 0,
            carry: Vec::new(),
        }
    }

    /// False once a bounded region has grown past its cap.
    fn feed(&mut self, chunk: &[u8]) -> bool {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            let pattern: &[u8] = match self.region {
                // The first delimiter may open the body, without its line break.
                Region::Preamble => &self.delimiter[2..],
                Region::Content => &self.delimiter,
                Region::Headers => b"\r\n\r\n",
            };
            match find(rest, pattern) {
                Some(p) => {
                    if self.region != Region::Content {
                        self.run += p;
                        if self.run > REGION_CAP {
                            return false;
                        }
                    }
                    at += p + pattern.len();
                    self.run = 0;
                    self.region = match self.region {
                        Region::Preamble | Region::Content => Region::Headers,
                        Region::Headers => Region::Content,
                    };
                }
                None => {
                    // Keep what could be the start of the pattern for the next chunk.
                    let keep = (pattern.len() - 1).min(rest.len());
                    let scanned = rest.len() - keep;
                    if self.region != Region::Content {
                        self.run += scanned;
                        if self.run > REGION_CAP {
                            return false;
                        }
                    }
                    self.carry = rest[scanned..].to_vec();
                    return true;
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (headers, data) in parts {
            out.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n").as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    fn scan(body: &[u8], chunk: usize) -> bool {
        let mut s = Scanner::new("XyZ");
        body.chunks(chunk).all(|c| s.feed(c))
    }

    #[test]
    fn ordinary_forms_pass_whatever_the_chunking() {
        let data = vec![b'-'; 100_000];
        let body = form(
            "XyZ",
            &[
                (
                    "Content-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"",
                    &data,
                ),
                (
                    "Content-Disposition: form-data; name=\"file\"",
                    b"\r\n--Xy not it\r\n\r\n",
                ),
            ],
        );
        for chunk in [1, 3, 7, 64, 4096, body.len()] {
            assert!(scan(&body, chunk), "chunks of {chunk}");
        }
    }

    #[test]
    fn huge_part_headers_preambles_and_epilogues_are_stopped() {
        let long = "X-Pad: ".to_owned() + &"a".repeat(REGION_CAP + 10);
        let body = form("XyZ", &[(&long, b"data")]);
        assert!(!scan(&body, 1000));
        let mut preamble = vec![b'p'; REGION_CAP + 1];
        preamble.extend(form(
            "XyZ",
            &[("Content-Disposition: form-data; name=\"file\"", b"d")],
        ));
        assert!(!scan(&preamble, 4096));
        let mut epilogue = form(
            "XyZ",
            &[("Content-Disposition: form-data; name=\"file\"", b"d")],
        );
        epilogue.extend(vec![b'e'; REGION_CAP + 1]);
        assert!(!scan(&epilogue, 512));
        // Large content is not a header.
        let big = vec![0u8; REGION_CAP * 4];
        assert!(scan(
            &form(
                "XyZ",
                &[("Content-Disposition: form-data; name=\"file\"", &big)]
            ),
            777
        ));
    }
}
