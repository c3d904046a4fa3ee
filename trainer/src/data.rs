//! The MNIST data set as in-memory tensors, decoded once from the IDX files of a
//! stored data set (or a directory of the four `.gz` files).

use std::path::Path;

use bytes::Bytes;
use mnistflow_nats::{DatasetFile, DatasetId};
use mnistflow_store::idx;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// The four files of a data set, in the order [`RawMnist::files`] holds them.
pub const FILE_NAMES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// Why a data set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{name}: {source}")]
    Idx { name: String, source: idx::IdxError },
    #[error("{name}: {message}")]
    Shape { name: String, message: String },
    #[error("{name}: decompressed content has SHA-256 {actual}, the manifest says {expected}")]
    Checksum { name: String, expected: String, actual: String },
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The compressed files of a data set, fetched but not yet decoded.
#[derive(Debug, Clone)]
pub struct RawMnist {
    pub dataset_id: Option<DatasetId>,
    /// Train images, train labels, test images, test labels (see [`FILE_NAMES`]).
    pub files: [Bytes; 4],
    /// The manifest's record of each file (for checksums), when known.
    pub manifest: Vec<DatasetFile>,
}

impl RawMnist {
    /// Reads the four `.gz` files from a directory (tests, benchmarks).
    ///
    /// # Errors
    /// A file is missing or unreadable.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map(Bytes::from)
                .map_err(|source| DataError::Io { path: path.display().to_string(), source })
        };
        Ok(Self {
            dataset_id: None,
            files: [read(FILE_NAMES[0])?, read(FILE_NAMES[1])?, read(FILE_NAMES[2])?, read(FILE_NAMES[3])?],
            manifest: Vec::new(),
        })
    }
}

/// What the metadata records about the data a model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataSummary {
    pub train_count: u64,
    pub test_count: u64,
    /// SHA-256 of each decompressed file, verified against the manifest when there is one.
    pub files: Vec<DatasetFile>,
}

/// The decoded data set: images as `u8 [N, 1, 28, 28]` (the file's bytes: a
/// quarter of the memory of floats; [`pixels`] converts a batch), labels as `i64 [N]`.
#[derive(Debug)]
pub struct Mnist {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
    pub summary: DataSummary,
}

impl Mnist {
    /// Decompresses and validates the files once, keeping the pixels as bytes.
    ///
    /// # Errors
    /// A file is not valid IDX, shapes disagree, or a checksum differs from the manifest.
    pub fn decode(raw: &RawMnist) -> Result<Self, DataError> {
        let mut summary = DataSummary { train_count: 0, test_count: 0, files: Vec::new() };
        let mut decoded = Vec::with_capacity(4);
        for (name, gz) in FILE_NAMES.iter().zip(&raw.files) {
            let plain = idx::gunzip(gz).map_err(|source| DataError::Idx { name: (*name).into(), source })?;
            let sha256 = mnistflow_store::sha256_hex(&plain);
            if let Some(expected) = raw.manifest.iter().find(|f| f.name == *name)
                && expected.sha256 != sha256
            {
                return Err(DataError::Checksum {
                    name: (*name).into(),
                    expected: expected.sha256.clone(),
                    actual: sha256,
                });
            }
            let parsed = idx::parse(&plain).map_err(|source| DataError::Idx { name: (*name).into(), source })?;
            summary.files.push(DatasetFile {
                name: (*name).into(),
                sha256,
                size_bytes: plain.len() as u64,
                count: parsed.count() as u64,
            });
            decoded.push(parsed);
        }
        let images = |i: usize| -> Result<Tensor, DataError> {
            let d = &decoded[i];
            if d.dims.len() != 3 || d.dims[1] != 28 || d.dims[2] != 28 {
                return Err(DataError::Shape {
                    name: FILE_NAMES[i].into(),
                    message: format!("images are {:?}, not [N, 28, 28]", d.dims),
                });
            }
            let n = d.count() as i64;
            Ok(Tensor::f_from_slice(&d.data)?.f_view([n, 1, 28, 28])?)
        };
        let labels = |i: usize, images: &Tensor| -> Result<Tensor, DataError> {
            let d = &decoded[i];
            let name = FILE_NAMES[i];
            if d.dims.len() != 1 {
                return Err(DataError::Shape {
                    name: name.into(),
                    message: format!("labels are {:?}, not [N]", d.dims),
                });
            }
            if d.count() as i64 != images.size()[0] {
                return Err(DataError::Shape {
                    name: name.into(),
                    message: format!("{} labels for {} images", d.count(), images.size()[0]),
                });
            }
            if let Some(bad) = d.data.iter().find(|l| **l > 9) {
                return Err(DataError::Shape { name: name.into(), message: format!("label {bad} is not a digit") });
            }
            Ok(Tensor::f_from_slice(&d.data)?.f_to_kind(Kind::Int64)?)
        };
        let train_images = images(0)?;
        let train_labels = labels(1, &train_images)?;
        let test_images = images(2)?;
        let test_labels = labels(3, &test_images)?;
        summary.train_count = train_images.size()[0] as u64;
        summary.test_count = test_images.size()[0] as u64;
        Ok(Self { train_images, train_labels, test_images, test_labels, summary })
    }

    /// The first `n` test images as float pixels (the export's round-trip check).
    ///
    /// # Errors
    /// A libtorch error.
    pub fn test_sample(&self, n: i64) -> Result<Tensor, tch::TchError> {
        pixels(&self.test_images.f_narrow(0, 0, n.min(self.test_images.size()[0]))?)
    }

    /// Moves the tensors to `device` (a no-op on the CPU).
    ///
    /// # Errors
    /// The device cannot hold them.
    pub fn to_device(self, device: Device) -> Result<Self, DataError> {
        if device == Device::Cpu {
            return Ok(self);
        }
        Ok(Self {
            train_images: self.train_images.f_to_device(device)?,
            train_labels: self.train_labels.f_to_device(device)?,
            test_images: self.test_images.f_to_device(device)?,
            test_labels: self.test_labels.f_to_device(device)?,
            summary: self.summary,
        })
    }
}

/// Images as the network takes them: float in `[0, 1]`. Bytes (the stored
/// form) are divided by 255; float tensors are passed through.
///
/// # Errors
/// A libtorch error.
pub fn pixels(images: &Tensor) -> Result<Tensor, tch::TchError> {
    if images.kind() == Kind::Uint8 {
        images.f_to_kind(Kind::Float)?.f_div_scalar(255.0)
    } else {
        Ok(images.shallow_clone())
    }
}
