//! Differential: a stream of pipelined requests split into messages by agentlb
//! (`h1::parse_request`, `h1::request_framing`, `h1::Chunked`) and by a reference
//! written from RFC 9112 here (`httparse` for the head, the framing rules of §6.3, a
//! strict chunked decoder of §7.1). Both must agree on every message boundary and body,
//! and on where the stream stops being acceptable. agentlb's documented stricter rules
//! are the reference's too: CRLF only (no bare LF), at most 128 header fields, a
//! 64 KiB head, chunk sizes of at most 15 hex digits, chunk extensions and trailers of
//! at most 8 KiB, a message with both Transfer-Encoding and Content-Length refused, and
//! a request's Transfer-Encoding exactly `chunked` (no other coding, HTTP/1.1 only).
#![no_main]

use agentlb::proxy::h1::{self, Chunked, Framing};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const MAX_HEAD: usize = 64 * 1024;
const MAX_META: usize = 8 * 1024;
/// agentlb's bound on header (and trailer) fields.
const MAX_FIELDS: usize = 128;

/// One message: head length and body.
type Msg = (usize, Vec<u8>);

fn agentlb_split(data: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    let mut buf = BytesMut::from(data);
    for _ in 0..8 {
        let before = buf.len();
        let Ok(Some(head)) = h1::parse_request(&mut buf, MAX_HEAD) else {
            break;
        };
        let head_len = before - buf.len();
        let body = match h1::request_framing(&head) {
            Ok(Framing::Empty) => Vec::new(),
            Ok(Framing::Length(n)) => {
                let Ok(n) = usize::try_from(n) else { break };
                if buf.len() < n {
                    break;
                }
                buf.split_to(n).to_vec()
            }
            Ok(Framing::Chunked) => {
                let mut d = Chunked::new();
                let mut body = Vec::new();
                match d.decode(&buf, |x| body.extend_from_slice(x)) {
                    Ok(used) if d.done() => {
                        let _ = buf.split_to(used);
                        body
                    }
                    _ => break,
                }
            }
            Ok(Framing::Close) | Err(_) => break,
        };
        out.push((head_len, body));
    }
    out
}

fn bare_lf(b: &[u8]) -> bool {
    b.iter()
        .enumerate()
        .any(|(i, &c)| c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// RFC 9112 §7.1, strictly: `size [; ext] CRLF data CRLF` ... `0 [; ext] CRLF
/// *(field CRLF) CRLF`. Returns the bytes used and the data.
fn reference_chunked(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut i = 0;
    let mut data = Vec::new();
    let mut meta = 0usize;
    loop {
        let line_end = b[i..].windows(2).position(|w| w == b"\r\n")? + i;
        let line = &b[i..line_end];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return None;
        }
        let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 15 {
            return None;
        }
        let rest = &line[digits..];
        if !rest.is_empty() && !matches!(rest[0], b';' | b' ' | b'\t') {
            return None;
        }
        meta += rest.len();
        if meta > MAX_META {
            return None;
        }
        let size = usize::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            break;
        }
        if b.len() < i + size + 2 || &b[i + size..i + size + 2] != b"\r\n" {
            return None;
        }
        data.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
    // Trailer section: fields as in a head, then CRLF.
    let end = if b[i..].starts_with(b"\r\n") {
        i + 2
    } else {
        let t = b[i..].windows(4).position(|w| w == b"\r\n\r\n")? + i + 4;
        let section = &b[i..t];
        if section.len() > MAX_META || bare_lf(section) {
            return None;
        }
        // The head's field-count bound applies to trailers too.
        let mut headers = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match httparse::parse_headers(section, &mut headers) {
            Ok(httparse::Status::Complete((n, _))) if n == section.len() => {}
            _ => return None,
        }
        t
    };
    Some((end, data))
}

fn reference_split(data: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    let mut at = 0;
    for _ in 0..8 {
        let rest = &data[at..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => break,
        };
        if head_len > MAX_HEAD || bare_lf(&rest[..head_len]) {
            break;
        }
        let te: Vec<&[u8]> = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| h.value)
            .collect();
        let cl: Vec<&[u8]> = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| h.value)
            .collect();
        let body_at = at + head_len;
        let body = if !te.is_empty() {
            if !cl.is_empty() {
                break;
            }
            let codings: Vec<&[u8]> = te
                .iter()
                .flat_map(|v| v.split(|&c| c == b','))
                .map(trim)
                .filter(|c| !c.is_empty())
                .collect();
            // agentlb's documented request rule: `chunked` alone, once, HTTP/1.1.
            if req.version != Some(1)
                || codings.len() != 1
                || !codings[0].eq_ignore_ascii_case(b"chunked")
            {
                break;
            }
            let Some((used, body)) = reference_chunked(&data[body_at..]) else {
                break;
            };
            at = body_at + used;
            body
        } else if !cl.is_empty() {
            // Every value 1*DIGIT (at most 19: agentlb's bound) and all the same number
            // (RFC 9110 §8.6 lets a recipient accept a list of one repeated length).
            let values: Vec<Option<usize>> = cl
                .iter()
                .flat_map(|v| v.split(|&c| c == b','))
                .map(trim)
                .map(|v| {
                    (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                        .then(|| std::str::from_utf8(v).ok()?.parse::<usize>().ok())
                        .flatten()
                })
                .collect();
            let Some(Some(n)) = values.first().copied() else {
                break;
            };
            if values.iter().any(|v| *v != Some(n)) {
                break;
            }
            if data.len() < body_at + n {
                break;
            }
            at = body_at + n;
            data[body_at..at].to_vec()
        } else {
            at = body_at;
            Vec::new()
        };
        out.push((head_len, body));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let a = agentlb_split(data);
    let r = reference_split(data);
    assert_eq!(
        a, r,
        "agentlb and the reference split the stream differently"
    );
});
