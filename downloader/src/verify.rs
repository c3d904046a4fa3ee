//! What makes a downloaded file trustworthy: the SHA-256 of its *decompressed*
//! content (the public mirrors' `.gz` bytes differ from one another, the content
//! does not), a well-formed IDX header whose dimensions match the body, and the
//! MNIST shape (28x28 images, labels 0..9, as many labels as images).
//!
//! Everything is checked in one streaming pass over the staged `.gz` file with a
//! fixed buffer: memory stays flat whatever the file size.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use mnistflow_nats::{DatasetFile, DatasetId};
use sha2::{Digest, Sha256};

/// Images or labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Images,
    Labels,
}

/// One of the four MNIST files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MnistFile {
    /// The name mirrors serve and the store keeps.
    pub name: &'static str,
    pub kind: Kind,
    /// Part of the training split (else the test split).
    pub train: bool,
}

/// The four files, in the canonical order every list in this crate follows.
pub static FILES: [MnistFile; 4] = [
    MnistFile { name: "train-images-idx3-ubyte.gz", kind: Kind::Images, train: true },
    MnistFile { name: "train-labels-idx1-ubyte.gz", kind: Kind::Labels, train: true },
    MnistFile { name: "t10k-images-idx3-ubyte.gz", kind: Kind::Images, train: false },
    MnistFile { name: "t10k-labels-idx1-ubyte.gz", kind: Kind::Labels, train: false },
];

/// The published SHA-256 of the decompressed MNIST files, in [`FILES`] order
/// (see `../shared/mnist/README.md`).
pub const KNOWN_SHA256: [&str; 4] = [
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
];

/// MNIST images are 28x28.
pub const IMAGE_SIDE: u32 = 28;

/// Why a staged file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The gzip stream ended early: the transfer was cut short, try again.
    #[error("the gzip data ends early (truncated transfer)")]
    TruncatedGzip,
    #[error("not gzip data, or a corrupt gzip stream: {0}")]
    Gzip(String),
    #[error("checksum mismatch: SHA-256 of the decompressed content is {actual}, expected {expected}")]
    Checksum { expected: String, actual: String },
    #[error("not a valid MNIST IDX file: {0}")]
    Idx(String),
    #[error("reading the staged file: {0}")]
    Io(std::io::Error),
}

/// What the verification found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    pub name: String,
    /// SHA-256 of the decompressed content, lower-case hex.
    pub sha256: String,
    /// Decompressed size.
    pub size_bytes: u64,
    /// IDX dimensions: `[count]` or `[count, rows, cols]`.
    pub dims: Vec<u32>,
}

impl FileReport {
    /// Images or labels in the file.
    pub fn count(&self) -> u64 {
        self.dims.first().copied().map_or(0, u64::from)
    }

    /// The manifest / event entry for this file.
    pub fn to_dataset_file(&self) -> DatasetFile {
        DatasetFile {
            name: self.name.clone(),
            sha256: self.sha256.clone(),
            size_bytes: self.size_bytes,
            count: self.count(),
        }
    }
}

/// Streams decompressed bytes through SHA-256 while reading the IDX header and,
/// for labels, checking every value.
struct Inspector {
    hasher: Sha256,
    header: Vec<u8>,
    header_len: Option<usize>,
    total: u64,
    labels: bool,
    max_label: u8,
}

impl Inspector {
    fn new(kind: Kind) -> Self {
        Self {
            hasher: Sha256::new(),
            header: Vec::with_capacity(16),
            header_len: None,
            total: 0,
            labels: kind == Kind::Labels,
            max_label: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        self.hasher.update(bytes);
        self.total += bytes.len() as u64;
        // The header is at most 4 + 4 * 4 bytes: collect it, then only scan the body.
        while self.header_len.is_none_or(|len| self.header.len() < len) && !bytes.is_empty() {
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if self.header.len() == 4 {
                self.header_len = Some(4 + 4 * usize::from(self.header[3]));
            }
        }
        if self.labels
            && let Some(&max) = bytes.iter().max()
        {
            self.max_label = self.max_label.max(max);
        }
    }

    fn finish(self, file: &MnistFile, expected: Option<&str>) -> Result<FileReport, VerifyError> {
        let sha256 = hex::encode(self.hasher.finalize());
        if let Some(expected) = expected
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(VerifyError::Checksum { expected: expected.to_ascii_lowercase(), actual: sha256 });
        }
        let idx = |m: String| VerifyError::Idx(m);
        let magic = self.header.get(..4).ok_or_else(|| idx(format!("only {} bytes", self.total)))?;
        let want_dims = if file.kind == Kind::Images { 3 } else { 1 };
        if magic[..3] != [0, 0, 0x08] || usize::from(magic[3]) != want_dims {
            return Err(idx(format!("magic {magic:02x?}, expected [00, 00, 08, {want_dims:02x}]")));
        }
        let header_len = 4 + 4 * want_dims;
        if self.header.len() < header_len {
            return Err(idx("header truncated".into()));
        }
        let dims: Vec<u32> =
            self.header[4..header_len].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
        let body: u64 = dims.iter().map(|d| u64::from(*d)).product();
        let actual_body = self.total - header_len as u64;
        if actual_body != body {
            return Err(idx(format!(
                "the header {dims:?} announces {body} bytes of data, the file holds {actual_body}"
            )));
        }
        if dims[0] == 0 {
            return Err(idx("no items".into()));
        }
        if file.kind == Kind::Images && dims[1..] != [IMAGE_SIDE, IMAGE_SIDE] {
            return Err(idx(format!("images are {}x{}, expected 28x28", dims[1], dims[2])));
        }
        if self.labels && self.max_label > 9 {
            return Err(idx(format!("label {} is not a digit", self.max_label)));
        }
        Ok(FileReport { name: file.name.to_owned(), sha256, size_bytes: self.total, dims })
    }
}

/// Verifies a staged `.gz` file in one streaming pass (blocking: run it off the
/// async workers).
///
/// # Errors
/// See [`VerifyError`]; the checksum is checked first, so a well-formed file of
/// the wrong content is reported as a checksum mismatch.
pub fn verify_file(path: &Path, file: &MnistFile, expected: Option<&str>) -> Result<FileReport, VerifyError> {
    let staged = File::open(path).map_err(VerifyError::Io)?;
    let mut decoder = MultiGzDecoder::new(BufReader::with_capacity(128 * 1024, staged));
    let mut inspector = Inspector::new(file.kind);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => inspector.feed(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Err(VerifyError::TruncatedGzip),
            Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::InvalidData) => {
                return Err(VerifyError::Gzip(e.to_string()));
            }
            Err(e) => return Err(VerifyError::Io(e)),
        }
    }
    inspector.finish(file, expected)
}

/// Checks that the four files agree: as many labels as images in each split.
/// Returns `(train_count, test_count)`.
///
/// # Errors
/// A split's counts differ.
pub fn check_splits(reports: &[FileReport; 4]) -> Result<(u64, u64), String> {
    let pair = |images: &FileReport, labels: &FileReport| {
        if images.count() == labels.count() {
            Ok(images.count())
        } else {
            Err(format!(
                "{} holds {} images but {} holds {} labels",
                images.name,
                images.count(),
                labels.name,
                labels.count()
            ))
        }
    };
    Ok((pair(&reports[0], &reports[1])?, pair(&reports[2], &reports[3])?))
}

/// The content address of a data set: the first 16 hex digits of the SHA-256
/// over the four decompressed SHA-256 (in [`FILES`] order, one per line).
/// Identical data always gets the same id, whatever mirror or compression it came from.
pub fn dataset_id<S: AsRef<str>>(sha256: &[S; 4]) -> DatasetId {
    let mut hasher = Sha256::new();
    for h in sha256 {
        hasher.update(h.as_ref().to_ascii_lowercase().as_bytes());
        hasher.update(b"\n");
    }
    DatasetId(hex::encode(hasher.finalize())[..16].to_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn idx(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    fn staged(dir: &Path, content: &[u8]) -> std::path::PathBuf {
        let path = dir.join("f.gz");
        let mut enc = GzEncoder::new(File::create(&path).unwrap(), Compression::fast());
        enc.write_all(content).unwrap();
        enc.finish().unwrap();
        path
    }

    #[test]
    fn a_well_formed_file_is_reported_with_its_checksum_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let content = idx(&[3], &[0, 9, 4]);
        let path = staged(dir.path(), &content);
        let sha = hex::encode(Sha256::digest(&content));
        let report = verify_file(&path, &FILES[1], Some(&sha)).unwrap();
        assert_eq!(report.count(), 3);
        assert_eq!(report.size_bytes, content.len() as u64);
        assert_eq!(report.sha256, sha);
    }

    #[test]
    fn a_checksum_mismatch_names_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = staged(dir.path(), &idx(&[1], &[1]));
        let err = verify_file(&path, &FILES[1], Some(KNOWN_SHA256[1])).unwrap_err();
        assert!(matches!(err, VerifyError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains(KNOWN_SHA256[1]), "{err}");
    }

    #[test]
    fn malformed_idx_content_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&MnistFile, Vec<u8>, &str); 6] = [
            (&FILES[1], idx(&[3], &[0, 1]), "announces 3 bytes"),
            (&FILES[1], idx(&[2], &[0, 10]), "not a digit"),
            (&FILES[1], idx(&[1, 1, 1], &[0]), "magic"),
            (&FILES[0], idx(&[1, 28, 27], &[0; 28 * 27]), "28x28"),
            (&FILES[0], vec![0, 0, 8], "only 3 bytes"),
            (&FILES[1], idx(&[0], &[]), "no items"),
        ];
        for (file, content, needle) in cases {
            let path = staged(dir.path(), &content);
            let err = verify_file(&path, file, None).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn truncated_and_non_gzip_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = staged(dir.path(), &idx(&[1000], &[1; 1000]));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(verify_file(&path, &FILES[1], None), Err(VerifyError::TruncatedGzip)));
        std::fs::write(&path, b"<html>not found</html>").unwrap();
        assert!(matches!(verify_file(&path, &FILES[1], None), Err(VerifyError::Gzip(_))));
    }

    #[test]
    fn the_dataset_id_addresses_content_only() {
        let id = dataset_id(&KNOWN_SHA256);
        assert_eq!(id.as_str().len(), 16);
        assert_eq!(id, dataset_id(&KNOWN_SHA256.map(str::to_ascii_uppercase)));
        let mut other = KNOWN_SHA256;
        other.swap(0, 2);
        assert_ne!(id, dataset_id(&other));
    }

    #[test]
    fn splits_must_pair_images_with_labels() {
        let r =
            |name: &str, dims: Vec<u32>| FileReport { name: name.into(), sha256: String::new(), size_bytes: 0, dims };
        let ok = [r("a", vec![5, 28, 28]), r("b", vec![5]), r("c", vec![2, 28, 28]), r("d", vec![2])];
        assert_eq!(check_splits(&ok).unwrap(), (5, 2));
        let bad = [r("a", vec![5, 28, 28]), r("b", vec![5]), r("c", vec![2, 28, 28]), r("d", vec![3])];
        assert!(check_splits(&bad).unwrap_err().contains("d holds 3 labels"));
    }
}
