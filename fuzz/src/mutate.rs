//! The mutation engine: byte-level mutations for every target, token-level ones for text
//! targets, and a length-prefixed container for targets whose input is several files.

use crate::rng::Rng;

/// Bytes that often sit on a boundary of some check.
const INTERESTING: &[u8] = &[0, 0xff, 0x7f, 0x80, 0x01, 0xfe, b'0', b'1', b'9', b'-'];
/// Replacements for a number in text inputs.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "-1e308",
    "1e999",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "-0.0",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "99999999999999999999999999",
    "1.7976931348623157e308",
    "null",
    "true",
    "\"7\"",
    "[]",
    "{}",
];
const SWAPS: &[(u8, u8)] = &[
    (b'"', b'\''),
    (b'[', b'{'),
    (b']', b'}'),
    (b':', b','),
    (b'{', b'['),
];

/// One to four stacked mutations of `input`; `other` is a second seed to splice from. The
/// result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], text: bool, max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if text && rng.one_in(2) {
            mutate_text(rng, &mut out);
        } else {
            mutate_bytes(rng, &mut out, other);
        }
    }
    out.truncate(max_len);
    out
}

fn mutate_bytes(rng: &mut Rng, v: &mut Vec<u8>, other: &[u8]) {
    if v.is_empty() {
        v.push(*rng.pick(INTERESTING));
        return;
    }
    let at = rng.below(v.len());
    match rng.below(9) {
        0 => v[at] ^= 1 << rng.below(8),
        1 => v[at] = *rng.pick(INTERESTING),
        2 => v[at] = rng.next_u64() as u8,
        3 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                v.insert(at, rng.next_u64() as u8);
            }
        }
        4 => {
            let end = (at + 1 + rng.below(64)).min(v.len());
            v.drain(at..end);
        }
        5 => {
            // Duplicate a range (a repeated header entry, a doubled row).
            let end = (at + 1 + rng.below(256)).min(v.len());
            let chunk = v[at..end].to_vec();
            let to = rng.below(v.len() + 1);
            v.splice(to..to, chunk);
        }
        6 => v.truncate(at),
        7 => splice(rng, v, other),
        _ => {
            // A little-endian length or offset overwritten with an extreme value.
            let value: u64 = *rng.pick(&[0, 1, u32::MAX as u64, u64::MAX, 1 << 31, 1 << 40]);
            for (i, b) in value.to_le_bytes().iter().take(v.len() - at).enumerate() {
                v[at + i] = *b;
            }
        }
    }
}

/// Replaces the tail of `v` from a random point with the tail of `other` from another point.
fn splice(rng: &mut Rng, v: &mut Vec<u8>, other: &[u8]) {
    if other.is_empty() {
        return;
    }
    let at = rng.below(v.len() + 1);
    let from = rng.below(other.len());
    v.truncate(at);
    v.extend_from_slice(&other[from..]);
}

fn mutate_text(rng: &mut Rng, v: &mut Vec<u8>) {
    match rng.below(5) {
        0 | 1 => replace_number(rng, v),
        2 => duplicate_line(rng, v),
        3 => drop_line(rng, v),
        _ => swap_punctuation(rng, v),
    }
}

/// Replaces a run of digits (with its sign and decimals) by an extreme or odd number.
fn replace_number(rng: &mut Rng, v: &mut Vec<u8>) {
    let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit()).collect();
    if digits.is_empty() {
        return;
    }
    let mut start = *rng.pick(&digits);
    while start > 0 && (v[start - 1].is_ascii_digit() || b"-.".contains(&v[start - 1])) {
        start -= 1;
    }
    let mut end = start;
    while end < v.len() && (v[end].is_ascii_digit() || b"-.eE+".contains(&v[end])) {
        end += 1;
    }
    let with = rng.pick(NUMBERS).as_bytes().to_vec();
    v.splice(start..end, with);
}

fn line_bounds(rng: &mut Rng, v: &[u8]) -> (usize, usize) {
    let at = rng.below(v.len());
    let start = v[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = v[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(v.len(), |i| at + i + 1);
    (start, end)
}

fn duplicate_line(rng: &mut Rng, v: &mut Vec<u8>) {
    if v.is_empty() {
        return;
    }
    let (start, end) = line_bounds(rng, v);
    let line = v[start..end].to_vec();
    let times = if rng.one_in(8) { 64 } else { 1 };
    for _ in 0..times {
        v.splice(end..end, line.iter().copied());
    }
}

fn drop_line(rng: &mut Rng, v: &mut Vec<u8>) {
    if v.is_empty() {
        return;
    }
    let (start, end) = line_bounds(rng, v);
    v.drain(start..end);
}

fn swap_punctuation(rng: &mut Rng, v: &mut [u8]) {
    let (a, b) = *rng.pick(SWAPS);
    let hits: Vec<usize> = (0..v.len()).filter(|&i| v[i] == a || v[i] == b).collect();
    if hits.is_empty() {
        return;
    }
    let i = *rng.pick(&hits);
    v[i] = if v[i] == a { b } else { a };
}

/// Several files in one input: every part but the last prefixed by its u32 LE length.
pub fn pack(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

/// The `n` parts of a [`pack`]ed input; a mutated length is clamped to what is left, and
/// missing parts are empty, so every input unpacks.
pub fn unpack(input: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = input;
    for _ in 0..n.saturating_sub(1) {
        if rest.len() < 4 {
            parts.push(&rest[..0]);
            continue;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let len = len.min(rest.len() - 4);
        parts.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    parts.push(rest);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_any_input_unpacks() {
        let packed = pack(&[b"ab", b"", b"cde"]);
        assert_eq!(unpack(&packed, 3), vec![&b"ab"[..], b"", b"cde"]);
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let m = mutate(&mut rng, &packed, b"xyz", true, 64);
            assert_eq!(unpack(&m, 3).len(), 3);
        }
    }

    #[test]
    fn mutations_are_deterministic() {
        let seed = b"{\"a\": 12, \"b\": [1.5]}\nline two 3\n";
        let run = |s| {
            let mut rng = Rng::new(s);
            (0..50)
                .map(|_| mutate(&mut rng, seed, b"", true, 4096))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }
}
