//! The IDX format of the MNIST files: a big-endian header (`0x00 0x00 <type>
//! <ndims>`, then one `u32` per dimension) and the raw data. Only unsigned bytes
//! (type `0x08`) occur in MNIST; that is all this module accepts.

use std::io::Read;

/// A decoded IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idx {
    /// `[count]` for labels, `[count, rows, cols]` for images.
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Why a file is not a valid IDX file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdxError {
    #[error("not gzip data or corrupt gzip stream: {0}")]
    Gzip(String),
    #[error("bad IDX magic {0:02x?} (expected 00 00 08 <ndims>)")]
    Magic([u8; 4]),
    #[error("IDX header truncated")]
    TruncatedHeader,
    #[error("IDX body has {actual} bytes, the header announces {expected}")]
    Length { expected: usize, actual: usize },
}

impl Idx {
    /// The number of items (the first dimension).
    pub fn count(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Bytes per item (product of the other dimensions; 1 for labels).
    pub fn item_len(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
}

/// Parses an uncompressed IDX file.
///
/// # Errors
/// Wrong magic, truncated header, or a body whose length disagrees with the header.
pub fn parse(bytes: &[u8]) -> Result<Idx, IdxError> {
    let magic: [u8; 4] =
        bytes.get(..4).ok_or(IdxError::TruncatedHeader)?.try_into().map_err(|_| IdxError::TruncatedHeader)?;
    if magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] == 0 || magic[3] > 4 {
        return Err(IdxError::Magic(magic));
    }
    let ndims = usize::from(magic[3]);
    let header_len = 4 + 4 * ndims;
    let header = bytes.get(4..header_len).ok_or(IdxError::TruncatedHeader)?;
    let dims: Vec<usize> =
        header.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).unwrap_or(usize::MAX);
    let body = &bytes[header_len..];
    if body.len() != expected {
        return Err(IdxError::Length { expected, actual: body.len() });
    }
    Ok(Idx { dims, data: body.to_vec() })
}

/// Decompresses gzip data completely.
///
/// # Errors
/// Not gzip, or a corrupt / truncated stream.
pub fn gunzip(gz: &[u8]) -> Result<Vec<u8>, IdxError> {
    let mut out = Vec::with_capacity(gz.len() * 4);
    flate2::read::GzDecoder::new(gz).read_to_end(&mut out).map_err(|e| IdxError::Gzip(e.to_string()))?;
    Ok(out)
}

/// Decompresses and parses a `.gz` IDX file.
///
/// # Errors
/// See [`gunzip`] and [`parse`].
pub fn parse_gz(gz: &[u8]) -> Result<Idx, IdxError> {
    parse(&gunzip(gz)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_validated() {
        let mut ok = vec![0, 0, 8, 1, 0, 0, 0, 3];
        ok.extend([1, 2, 3]);
        assert_eq!(parse(&ok).unwrap().count(), 3);
        assert!(matches!(parse(&ok[..10]), Err(IdxError::Length { expected: 3, actual: 2 })));
        assert!(matches!(parse(&[0, 0, 9, 1, 0, 0, 0, 0]), Err(IdxError::Magic(_))));
        assert!(matches!(parse(&[0, 0, 8, 3, 0]), Err(IdxError::TruncatedHeader)));
        assert!(matches!(gunzip(b"plain"), Err(IdxError::Gzip(_))));
    }
}
