//! What the fuzz targets share.

/// `stream` cut into pieces of 1 to `max` bytes, the sizes from a tiny xorshift seeded by
/// `seed`: how a socket might hand the bytes over.
pub fn split(stream: &[u8], seed: u8, max: usize) -> Vec<&[u8]> {
    let mut x = u32::from(seed) | 0x100;
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x as usize % max + 1).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}
