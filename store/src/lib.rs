//! mnistflow's persistent storage layer (the seed's PVC "bridge") over
//! [`object_store`]: a local directory or PVC, `memory://` for tests, `gs://` and `s3://`.
//!
//! Layout (see DESIGN.md):
//!
//! ```text
//! datasets/mnist/<dataset-id>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
//! datasets/mnist/<dataset-id>/manifest.json      written last: the data set's commit marker
//! models/mnist-cnn/<version>/model.pt            TorchScript
//! models/mnist-cnn/<version>/metadata.sig        the metadata's ed25519 signature (see [`signing`])
//! models/mnist-cnn/<version>/metadata.json       written last, holds model.pt's SHA-256
//! models/mnist-cnn/CURRENT                       the version to serve, moved only to complete versions
//! feedback/mnist/samples/{trusted,unverified}/<client>/<event-id>.json   one sample per feedback event
//! feedback/mnist/INDEX.json                      the feedback set's version, counts, live accuracy
//! models/mnist-cnn/PINNED, SERVED.json            retention: versions never pruned, when each was served
//! ```
//!
//! A reader never sees a half-written artefact: a data set exists once its
//! manifest exists, a model version once its metadata exists *and* the model's
//! bytes match the SHA-256 recorded there, and `CURRENT` only ever names such a
//! version. Each single object is written atomically by the backend (temp file +
//! rename locally, a single PUT or completed multipart upload remotely).
//!
//! Parts: [`Store`] (open, datasets, models, promote; pinned versions, served
//! history and deletion for retention), [`watch`] (follow `CURRENT`),
//! [`idx`] (the MNIST file format), [`feedback`] (the feedback set), [`signing`]
//! (signed versions: keys, keyring).

mod current;
pub mod feedback;
pub mod idx;
mod retention;
pub mod signing;
mod store;
pub mod watch;

pub use current::CurrentPointer;
pub use feedback::{
    FEEDBACK_INDEX_KEY, FEEDBACK_PREFIX, FeedbackIndex, FeedbackOutcome, FeedbackPrune, FeedbackSample,
};
pub use retention::{PINNED_KEY, SERVED_KEY, ServedHistory};
pub use signing::{Keyring, SignatureError, SigningKey};
pub use store::{
    DatasetManifest, METADATA_MIN_SCHEMA_VERSION, METADATA_SCHEMA_VERSION, ModelMetadata, SigningMigration, Store,
    StoreError, sha256_hex,
};

/// Where data sets live.
pub const DATASETS_PREFIX: &str = "datasets/mnist";
/// Where model versions live.
pub const MODELS_PREFIX: &str = "models/mnist-cnn";
/// The pointer to the served version.
pub const CURRENT_KEY: &str = "models/mnist-cnn/CURRENT";
/// On a local or shared directory: one record per move of `CURRENT`, created
/// exclusively (the compare-and-set; see [`CurrentPointer`]).
pub const CURRENT_LOG_PREFIX: &str = "models/mnist-cnn.current";
/// Written once the versions published before signing were signed
/// ([`Store::sign_unsigned_versions`]).
pub const SIGNING_MIGRATED_KEY: &str = "models/mnist-cnn.signing-migrated.json";
/// A data set's commit marker.
pub const MANIFEST_FILE: &str = "manifest.json";
/// A model version's TorchScript file.
pub const MODEL_FILE: &str = "model.pt";
/// A model version's commit marker.
pub const METADATA_FILE: &str = "metadata.json";
