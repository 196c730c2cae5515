//! The embedded store's write-ahead journal: the framing of its files, pure.
//!
//! One frame per committed batch of the writer: a little-endian `u32` payload length, its
//! complement (so a damaged length is told from a cut one), the `xxh3-64` of the payload,
//! then the payload, a sequence of [`Entry`]s. A frame is appended with one `write` and made
//! durable with one `fdatasync` before anyone in the batch hears back, so only the end of a
//! file can hold a write a crash cut short: a frame running past the end of the file, or
//! failing its checksum with nothing but zeros after it, or zeros where a header should be.
//! Such a tail was never acknowledged and is dropped. Anything else that fails a check is
//! damage, and reading stops with an error rather than drop what follows.

use xxhash_rust::xxh3::xxh3_64;

/// Bytes before a frame's payload: its length, the length's complement and the checksum.
pub const FRAME_HEADER: usize = 4 + 4 + 8;

const TAG_PUT: u8 = 1;
const TAG_LEASE: u8 = 2;
const TAG_DELETE: u8 = 3;

/// One change, as written. Keys are the store's encoded keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<K, V> {
    /// The record under `key` is now `value`, leased at `refreshed_at_ms`.
    Put {
        /// The encoded key.
        key: K,
        /// The store revision of this change.
        revision: u64,
        /// The lease stamp.
        refreshed_at_ms: u64,
        /// The value.
        value: V,
    },
    /// The record under `key` keeps its value; its revision and lease stamp move.
    Lease {
        /// The encoded key.
        key: K,
        /// The store revision of this change.
        revision: u64,
        /// The lease stamp.
        refreshed_at_ms: u64,
    },
    /// The record under `key` is gone.
    Delete {
        /// The encoded key.
        key: K,
        /// The store revision of this change.
        revision: u64,
    },
}

/// An entry borrowing its bytes, to write.
pub type EntryRef<'a> = Entry<&'a [u8], &'a [u8]>;
/// An entry owning its bytes, as read.
pub type OwnedEntry = Entry<Vec<u8>, Vec<u8>>;

impl<K, V> Entry<K, V> {
    /// The store revision of this change.
    pub fn revision(&self) -> u64 {
        match self {
            Entry::Put { revision, .. }
            | Entry::Lease { revision, .. }
            | Entry::Delete { revision, .. } => *revision,
        }
    }
}

/// Appends one frame holding `entries` to `out`.
///
/// # Panics
/// If the payload exceeds `u32::MAX` bytes (the writer's batches are bounded far below).
pub fn encode_frame<'a>(entries: impl IntoIterator<Item = EntryRef<'a>>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    for entry in entries {
        match entry {
            Entry::Put {
                key,
                revision,
                refreshed_at_ms,
                value,
            } => {
                out.push(TAG_PUT);
                out.extend_from_slice(&revision.to_le_bytes());
                put_bytes(out, key);
                out.extend_from_slice(&refreshed_at_ms.to_le_bytes());
                put_bytes(out, value);
            }
            Entry::Lease {
                key,
                revision,
                refreshed_at_ms,
            } => {
                out.push(TAG_LEASE);
                out.extend_from_slice(&revision.to_le_bytes());
                put_bytes(out, key);
                out.extend_from_slice(&refreshed_at_ms.to_le_bytes());
            }
            Entry::Delete { key, revision } => {
                out.push(TAG_DELETE);
                out.extend_from_slice(&revision.to_le_bytes());
                put_bytes(out, key);
            }
        }
    }
    let payload = &out[start + FRAME_HEADER..];
    let len = u32::try_from(payload.len()).expect("a journal frame above 4 GiB");
    let sum = xxh3_64(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&(!len).to_le_bytes());
    out[start + 8..start + FRAME_HEADER].copy_from_slice(&sum.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("a journal entry above 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// What a journal file holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Every entry of the complete frames, in order.
    pub entries: Vec<OwnedEntry>,
    /// How many bytes the complete frames take: where the next frame goes.
    pub valid_len: usize,
    /// Bytes after them: an incomplete last frame (a write cut short), dropped.
    pub torn: usize,
}

/// Why a journal file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// A frame's length does not match its complement.
    #[error("the frame at byte {offset} has a damaged length")]
    Length {
        /// Where the frame starts.
        offset: usize,
    },
    /// A frame fails its checksum and data follows it.
    #[error("the frame at byte {offset} fails its checksum and data follows it")]
    Checksum {
        /// Where the frame starts.
        offset: usize,
    },
    /// A frame's checksum holds but its entries do not parse: not this program's journal.
    #[error("the frame at byte {offset} holds a malformed entry")]
    Malformed {
        /// Where the frame starts.
        offset: usize,
    },
}

/// Reads the frames of one journal file.
pub fn read(bytes: &[u8]) -> Result<Read, Damage> {
    let zeros = |from: usize| bytes[from.min(bytes.len())..].iter().all(|b| *b == 0);
    let mut out = Read::default();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let Some(header) = rest.get(..FRAME_HEADER) else {
            break;
        };
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let check = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let sum = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if check != !len {
            if zeros(offset) {
                break;
            }
            return Err(Damage::Length { offset });
        }
        let Some(payload) = rest[FRAME_HEADER..].get(..len as usize) else {
            break;
        };
        if xxh3_64(payload) != sum {
            if zeros(offset + FRAME_HEADER + payload.len()) {
                break;
            }
            return Err(Damage::Checksum { offset });
        }
        parse_payload(payload, &mut out.entries).ok_or(Damage::Malformed { offset })?;
        offset += FRAME_HEADER + payload.len();
    }
    out.valid_len = offset;
    out.torn = bytes.len() - offset;
    Ok(out)
}

fn parse_payload(mut payload: &[u8], entries: &mut Vec<OwnedEntry>) -> Option<()> {
    while let Some((&tag, rest)) = payload.split_first() {
        payload = rest;
        let revision = take_u64(&mut payload)?;
        let key = take_bytes(&mut payload)?;
        let entry = match tag {
            TAG_PUT => {
                let refreshed_at_ms = take_u64(&mut payload)?;
                let value = take_bytes(&mut payload)?;
                Entry::Put {
                    key,
                    revision,
                    refreshed_at_ms,
                    value,
                }
            }
            TAG_LEASE => Entry::Lease {
                key,
                revision,
                refreshed_at_ms: take_u64(&mut payload)?,
            },
            TAG_DELETE => Entry::Delete { key, revision },
            _ => return None,
        };
        entries.push(entry);
    }
    Some(())
}

fn take_u64(bytes: &mut &[u8]) -> Option<u64> {
    let (head, rest) = bytes.split_at_checked(8)?;
    *bytes = rest;
    Some(u64::from_le_bytes(head.try_into().ok()?))
}

fn take_bytes(bytes: &mut &[u8]) -> Option<Vec<u8>> {
    let (len, rest) = bytes.split_at_checked(4)?;
    let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
    let (head, rest) = rest.split_at_checked(len)?;
    *bytes = rest;
    Some(head.to_vec())
}

/// The file name of journal generation `generation`; names sort as generations do.
pub fn file_name(generation: u64) -> String {
    format!("journal-{generation:020}.log")
}

/// The generation of a journal file name, `None` for any other name.
pub fn generation(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix("journal-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn borrowed(entries: &[OwnedEntry]) -> Vec<EntryRef<'_>> {
        entries
            .iter()
            .map(|e| match e {
                Entry::Put {
                    key,
                    revision,
                    refreshed_at_ms,
                    value,
                } => Entry::Put {
                    key: key.as_slice(),
                    revision: *revision,
                    refreshed_at_ms: *refreshed_at_ms,
                    value: value.as_slice(),
                },
                Entry::Lease {
                    key,
                    revision,
                    refreshed_at_ms,
                } => Entry::Lease {
                    key: key.as_slice(),
                    revision: *revision,
                    refreshed_at_ms: *refreshed_at_ms,
                },
                Entry::Delete { key, revision } => Entry::Delete {
                    key: key.as_slice(),
                    revision: *revision,
                },
            })
            .collect()
    }

    fn entry() -> impl Strategy<Value = OwnedEntry> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        prop_oneof![
            (bytes(), any::<u64>(), any::<u64>(), bytes()).prop_map(
                |(key, revision, at, value)| {
                    Entry::Put {
                        key,
                        revision,
                        refreshed_at_ms: at,
                        value,
                    }
                }
            ),
            (bytes(), any::<u64>(), any::<u64>()).prop_map(|(key, revision, at)| Entry::Lease {
                key,
                revision,
                refreshed_at_ms: at
            }),
            (bytes(), any::<u64>()).prop_map(|(key, revision)| Entry::Delete { key, revision }),
        ]
    }

    fn frames() -> impl Strategy<Value = Vec<Vec<OwnedEntry>>> {
        proptest::collection::vec(proptest::collection::vec(entry(), 1..5), 1..6)
    }

    fn encode(frames: &[Vec<OwnedEntry>]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for frame in frames {
            encode_frame(borrowed(frame), &mut out);
            ends.push(out.len());
        }
        (out, ends)
    }

    #[test]
    fn an_empty_file_holds_nothing() {
        assert_eq!(read(&[]).unwrap(), Read::default());
    }

    #[test]
    fn a_frame_with_a_bad_entry_tag_is_malformed() {
        let mut out = Vec::new();
        encode_frame(
            [Entry::Delete {
                key: b"k".as_slice(),
                revision: 1,
            }],
            &mut out,
        );
        out[FRAME_HEADER] = 9;
        let sum = xxh3_64(&out[FRAME_HEADER..]);
        out[8..FRAME_HEADER].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(read(&out), Err(Damage::Malformed { offset: 0 }));
    }

    #[test]
    fn names_sort_as_generations_and_parse_back() {
        assert!(file_name(9) < file_name(10));
        assert_eq!(generation(&file_name(42)), Some(42));
        assert_eq!(generation("journal-1.log"), None);
        assert_eq!(generation("pixiu-metadata.redb"), None);
    }

    proptest! {
        #[test]
        fn frames_read_back_as_written(frames in frames()) {
            let (bytes, _) = encode(&frames);
            let read = read(&bytes).unwrap();
            prop_assert_eq!(read.entries, frames.concat());
            prop_assert_eq!(read.valid_len, bytes.len());
            prop_assert_eq!(read.torn, 0);
        }

        /// A write cut anywhere leaves exactly the frames completed before it.
        #[test]
        fn a_cut_keeps_the_complete_frames(frames in frames(), cut in any::<prop::sample::Index>()) {
            let (bytes, ends) = encode(&frames);
            let cut = cut.index(bytes.len() + 1);
            let read = read(&bytes[..cut]).unwrap();
            let complete = ends.iter().filter(|end| **end <= cut).count();
            prop_assert_eq!(read.entries, frames[..complete].concat());
            prop_assert_eq!(read.valid_len, if complete == 0 { 0 } else { ends[complete - 1] });
            prop_assert_eq!(read.valid_len + read.torn, cut);
        }

        /// A damaged payload or checksum in the last frame drops that frame, as a cut
        /// write would; any other damaged byte is an error, never a silent loss of what
        /// follows it.
        #[test]
        fn a_damaged_byte_is_dropped_at_the_end_and_an_error_before(
            frames in frames(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let (mut bytes, ends) = encode(&frames);
            let at = at.index(bytes.len());
            bytes[at] ^= flip;
            let frame = ends.iter().filter(|end| **end <= at).count();
            let start = if frame == 0 { 0 } else { ends[frame - 1] };
            let in_length = at < start + 8;
            if frame == frames.len() - 1 && !in_length {
                let read = read(&bytes).unwrap();
                prop_assert_eq!(read.entries, frames[..frame].concat());
                prop_assert_eq!(read.valid_len, start);
            } else {
                prop_assert!(read(&bytes).is_err());
            }
        }

        /// Zeros after the frames (blocks allocated but never written before a crash) are a
        /// cut write, not damage.
        #[test]
        fn zeros_after_the_frames_are_dropped(frames in frames(), zeros in 1usize..64) {
            let (mut bytes, ends) = encode(&frames);
            bytes.resize(bytes.len() + zeros, 0);
            let read = read(&bytes).unwrap();
            prop_assert_eq!(read.entries, frames.concat());
            prop_assert_eq!(read.valid_len, *ends.last().unwrap());
            prop_assert_eq!(read.torn, zeros);
        }
    }
}
