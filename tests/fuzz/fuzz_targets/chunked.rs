//! The chunked decoder: any bytes, decoded at once or in two pieces, give the same
//! data, the same end and the same verdict.
#![no_main]

use agentlb::proxy::h1::Chunked;
use libfuzzer_sys::fuzz_target;

fn run(pieces: &[&[u8]]) -> (Vec<u8>, usize, bool, Option<String>) {
    let mut d = Chunked::new();
    let mut out = Vec::new();
    let mut used = 0;
    for p in pieces {
        match d.decode(p, |x| out.extend_from_slice(x)) {
            Ok(n) => {
                used += n;
                if d.done() {
                    return (out, used, true, None);
                }
                assert_eq!(n, p.len(), "a piece not consumed without the end");
            }
            Err(e) => return (out, used, false, Some(e.to_string())),
        }
    }
    (out, used, d.done(), None)
}

fuzz_target!(|data: &[u8]| {
    let whole = run(&[data]);
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let split = run(&[&data[..cut], &data[cut..]]);
    // The same verdict and data whatever the reads, and a body that ends ends at the
    // same byte (a refusal reports no position).
    if whole.3.is_none() {
        assert_eq!(whole.1, split.1, "consumed, split at {cut}");
    }
    assert_eq!(whole.2, split.2, "done, split at {cut}");
    assert_eq!(
        whole.3.is_some(),
        split.3.is_some(),
        "verdict, split at {cut}"
    );
    assert_eq!(whole.0, split.0, "data, split at {cut}");
});
