//! Request heads: `h1::parse_request` and everything read from a head, on any bytes;
//! a head fed in two pieces parses as it does whole (the connection reads in pieces).
#![no_main]

use agentlb::proxy::h1;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const MAX: usize = 16 * 1024;

fn summary(r: &Result<Option<h1::Head>, h1::HeadError>) -> String {
    match r {
        Ok(Some(h)) => {
            let fields: Vec<_> = h
                .fields()
                .map(|(k, n, v, _)| (k, n.to_vec(), v.to_vec()))
                .collect();
            format!(
                "{:?} {:?} {:?} {} {:?} {:?} {} {}",
                h.method(),
                h.path_and_query(),
                h.path(),
                h.minor,
                fields,
                h1::request_framing(h),
                h.keep_alive(),
                h.expects_continue()
            )
        }
        Ok(None) => "partial".into(),
        Err(e) => format!("error {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut whole = BytesMut::from(data);
    let a = h1::parse_request(&mut whole, MAX);
    let left_whole = whole.len();
    // The same bytes in two reads.
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut buf = BytesMut::from(&data[..cut]);
    let first = h1::parse_request(&mut buf, MAX);
    let b = match first {
        Ok(None) => {
            buf.extend_from_slice(&data[cut..]);
            h1::parse_request(&mut buf, MAX)
        }
        // Complete (or refused) in the first piece already: the whole parse must agree.
        other => {
            buf.extend_from_slice(&data[cut..]);
            other
        }
    };
    assert_eq!(summary(&a), summary(&b), "split at {cut}");
    if a.as_ref().is_ok_and(Option::is_some) {
        assert_eq!(left_whole, buf.len(), "bytes consumed differ");
    }
});
