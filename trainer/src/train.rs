//! The training loop, evaluation and TorchScript export: plain blocking code on
//! libtorch, run on a thread of its own by the worker.
//!
//! Speed matters here (the default run's whole budget is 80 s on two cores), so
//! the loop does no per-batch work beyond what the network needs: the data set
//! is decoded once, each batch is one `index_select` of a per-epoch
//! permutation; the loss is accumulated on the device and read only when
//! progress is reported; evaluation runs without autograd in batches of 250.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mnistflow_nats::ModelMetrics;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, TchError, Tensor};

use crate::data::Mnist;
use crate::model::Net;
use crate::params::{Hyperparameters, OptimizerKind, Precision};

/// The libtorch version tch 0.26 links (torch-sys refuses to build against another).
pub const LIBTORCH_VERSION: &str = "2.13.0";

/// Why training stopped without a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Shutdown was requested; the request should be redelivered.
    #[error("training cancelled")]
    Cancelled,
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
    /// The data set is unusable (corrupt, wrong shapes, checksum mismatch).
    #[error("data set: {0}")]
    Data(String),
    /// The loss became NaN or infinite (a learning rate far too high).
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: u64, loss: f64 },
}

/// A snapshot of a running training, reported at the configured interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// 1-based.
    pub epoch: u32,
    pub epochs: u32,
    /// Steps done so far, over all epochs.
    pub step: u64,
    pub steps: u64,
    /// Mean training loss since the previous report.
    pub loss: f64,
    /// Training examples per second since the previous report.
    pub examples_per_sec: f64,
    pub eta_secs: Option<f64>,
}

/// How the caller steers a run from outside its thread.
#[derive(Debug, Clone)]
pub struct Control {
    /// Set to stop at the next step with [`TrainError::Cancelled`].
    pub cancel: Arc<AtomicBool>,
    /// How often `on_progress` is called.
    pub progress_interval: Duration,
}

impl Default for Control {
    fn default() -> Self {
        Self { cancel: Arc::new(AtomicBool::new(false)), progress_interval: Duration::from_secs(2) }
    }
}

/// What a finished training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStats {
    pub steps: u64,
    pub examples: u64,
    pub train_secs: f64,
    pub examples_per_sec: f64,
    /// Mean training loss over the last reporting interval.
    pub final_loss: f64,
    /// Set when the time limit ended training before the last epoch.
    pub stopped_early: Option<String>,
    /// The precision the step ran in (`auto` resolved).
    pub precision: Precision,
}

/// A trained network and its parameters.
#[derive(Debug)]
pub struct Trained {
    pub vs: nn::VarStore,
    pub net: Net,
    pub stats: TrainStats,
}

/// Trains the seed's CNN on `data` (already on `device`).
///
/// # Errors
/// [`TrainError::Cancelled`] when `control.cancel` is set, a libtorch error, or divergence.
pub fn train(
    data: &Mnist,
    hp: &Hyperparameters,
    device: Device,
    control: &Control,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Trained, TrainError> {
    // libtorch's random generator is one per process: two runs at once (tests of
    // one binary, side by side) would draw each other's numbers, and a seed would
    // no longer reproduce its run. One run at a time per process, as a worker does.
    static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _run = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(hp.seed as i64);
    let vs = nn::VarStore::new(device);
    let net = Net::new(&vs.root());
    let mut opt = Optimizer::new(hp.optimizer, &vs, hp.learning_rate)?;
    let precision = hp.precision.resolve(device);

    let available = data.train_images.size()[0];
    let n = hp.max_train_examples.map_or(available, |m| (m as i64).min(available));
    let batch = i64::from(hp.batch_size).min(n);
    let steps_per_epoch = ((n + batch - 1) / batch) as u64;
    let total_steps = steps_per_epoch * u64::from(hp.epochs);
    let deadline = hp.max_minutes.map(|m| Instant::now() + Duration::from_secs_f64(m * 60.0));

    let started = Instant::now();
    let mut last_report = started;
    let mut step = 0u64;
    let mut examples = 0u64;
    let mut examples_at_report = 0u64;
    let mut loss_sum = Tensor::f_zeros([], (Kind::Float, device))?;
    let mut loss_count = 0u64;
    let mut final_loss = f64::NAN;
    let mut stopped_early = None;

    'epochs: for epoch in 1..=hp.epochs {
        // A fresh permutation per epoch; each batch gathers its rows from it and
        // converts them to floats (a 200 KB copy the step needs anyway, instead of
        // a shuffled copy of the whole set).
        let order = Tensor::f_randperm(available, (Kind::Int64, device))?.f_narrow(0, 0, n)?;
        for b in 0..steps_per_epoch as i64 {
            if control.cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let start = b * batch;
            let len = batch.min(n - start);
            let rows = order.f_narrow(0, start, len)?;
            let mut xs = crate::data::pixels(&data.train_images.f_index_select(0, &rows)?)?;
            let ys = data.train_labels.f_index_select(0, &rows)?;
            if hp.augment {
                xs = augment(&xs)?;
            }
            opt.set_lr(hp.learning_rate * hp.schedule.factor(step, total_steps, steps_per_epoch));
            let out = match precision {
                Precision::Bf16 => net.forward_mixed(&xs, true, Kind::BFloat16),
                _ => net.forward_t(&xs, true),
            };
            // The network's output is log-probabilities; cross-entropy's own
            // log-softmax leaves them unchanged, so it only adds the smoothing.
            let loss = if hp.label_smoothing > 0.0 {
                out.f_cross_entropy_loss::<Tensor>(&ys, None, tch::Reduction::Mean, -100, hp.label_smoothing)?
            } else {
                out.f_nll_loss::<Tensor>(&ys, None, tch::Reduction::Mean, -100)?
            };
            opt.zero_grad();
            loss.f_backward()?;
            opt.step()?;
            let _ = tch::no_grad(|| loss_sum.f_add_(&loss.detach()))?;
            loss_count += 1;
            step += 1;
            examples += len as u64;
            if let Some(deadline) = deadline
                && Instant::now() >= deadline
                && step < total_steps
            {
                stopped_early = Some(format!(
                    "time limit of {} min reached after {step} of {total_steps} steps",
                    hp.max_minutes.unwrap_or(0.0)
                ));
                break 'epochs;
            }

            let now = Instant::now();
            if now.duration_since(last_report) >= control.progress_interval || step == total_steps {
                let mean = tch::no_grad(|| loss_sum.f_double_value(&[]))? / loss_count.max(1) as f64;
                if !mean.is_finite() {
                    return Err(TrainError::Diverged { step, loss: mean });
                }
                let _ = loss_sum.f_zero_()?;
                loss_count = 0;
                final_loss = mean;
                let secs = now.duration_since(last_report).as_secs_f64().max(1e-9);
                let rate = (examples - examples_at_report) as f64 / secs;
                let overall = step as f64 / now.duration_since(started).as_secs_f64().max(1e-9);
                on_progress(&Progress {
                    epoch,
                    epochs: hp.epochs,
                    step,
                    steps: total_steps,
                    loss: mean,
                    examples_per_sec: rate,
                    eta_secs: Some((total_steps - step) as f64 / overall),
                });
                last_report = now;
                examples_at_report = examples;
            }
        }
    }
    let train_secs = started.elapsed().as_secs_f64();
    if final_loss.is_nan() && loss_count > 0 {
        final_loss = tch::no_grad(|| loss_sum.f_double_value(&[]))? / loss_count as f64;
    }
    Ok(Trained {
        vs,
        net,
        stats: TrainStats {
            steps: step,
            examples,
            train_secs,
            examples_per_sec: examples as f64 / train_secs.max(1e-9),
            final_loss,
            stopped_early,
            precision,
        },
    })
}

/// Random small affine transforms of a batch `[B, 1, 28, 28]`: rotation up to
/// ±10°, scaling by up to ±10 % and shifts of up to ±2 pixels, each drawn per image.
fn augment(xs: &Tensor) -> Result<Tensor, TchError> {
    let b = xs.size()[0];
    let opts = (Kind::Float, xs.device());
    let uniform = || -> Result<Tensor, TchError> { Tensor::f_rand([b], opts)?.f_mul_scalar(2.0)?.f_sub_scalar(1.0) };
    let angle = uniform()?.f_mul_scalar(10f64.to_radians())?;
    let scale = uniform()?.f_mul_scalar(0.1)?.f_add_scalar(1.0)?;
    // grid coordinates span [-1, 1] over 28 pixels: 2 px = 2/14.
    let tx = uniform()?.f_mul_scalar(2.0 / 14.0)?;
    let ty = uniform()?.f_mul_scalar(2.0 / 14.0)?;
    let cos = angle.f_cos()?.f_mul(&scale)?;
    let sin = angle.f_sin()?.f_mul(&scale)?;
    let row0 = Tensor::f_stack(&[&cos, &sin.f_neg()?, &tx], 1)?;
    let row1 = Tensor::f_stack(&[&sin, &cos, &ty], 1)?;
    let theta = Tensor::f_stack(&[row0, row1], 1)?;
    let grid = Tensor::f_affine_grid_generator(&theta, [b, 1, 28, 28], false)?;
    xs.f_grid_sampler(&grid, 0, 0, false)
}

/// tch's optimizers, plus Adadelta (the seed's), which tch lacks.
enum Optimizer {
    Tch(nn::Optimizer),
    Adadelta(Adadelta),
}

impl Optimizer {
    fn new(kind: OptimizerKind, vs: &nn::VarStore, lr: f64) -> Result<Self, TchError> {
        Ok(match kind {
            OptimizerKind::Adam => Self::Tch(nn::Adam::default().build(vs, lr)?),
            OptimizerKind::AdamW => Self::Tch(nn::AdamW::default().build(vs, lr)?),
            OptimizerKind::Sgd => Self::Tch(nn::sgd(0.9, 0.0, 0.0, true).build(vs, lr)?),
            OptimizerKind::RmsProp => Self::Tch(nn::RmsProp::default().build(vs, lr)?),
            OptimizerKind::Adadelta => Self::Adadelta(Adadelta::new(vs, lr)?),
        })
    }

    fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Tch(o) => o.set_lr(lr),
            Self::Adadelta(a) => a.lr = lr,
        }
    }

    fn zero_grad(&mut self) {
        match self {
            Self::Tch(o) => o.zero_grad(),
            Self::Adadelta(a) => a.zero_grad(),
        }
    }

    fn step(&mut self) -> Result<(), TchError> {
        match self {
            Self::Tch(o) => {
                o.step();
                Ok(())
            }
            Self::Adadelta(a) => a.step(),
        }
    }
}

/// Adadelta (Zeiler 2012) as PyTorch implements it: `rho` 0.9, `eps` 1e-6.
struct Adadelta {
    params: Vec<Tensor>,
    square_avg: Vec<Tensor>,
    acc_delta: Vec<Tensor>,
    lr: f64,
    rho: f64,
    eps: f64,
}

impl Adadelta {
    fn new(vs: &nn::VarStore, lr: f64) -> Result<Self, TchError> {
        let params = vs.trainable_variables();
        let zeros = |p: &Tensor| p.f_zeros_like();
        Ok(Self {
            square_avg: params.iter().map(zeros).collect::<Result<_, _>>()?,
            acc_delta: params.iter().map(zeros).collect::<Result<_, _>>()?,
            params,
            lr,
            rho: 0.9,
            eps: 1e-6,
        })
    }

    fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    fn step(&mut self) -> Result<(), TchError> {
        let (rho, eps, lr) = (self.rho, self.eps, self.lr);
        tch::no_grad(|| {
            for ((p, sq), acc) in self.params.iter_mut().zip(&mut self.square_avg).zip(&mut self.acc_delta) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = sq.f_mul_scalar_(rho)?.f_add_(&g.f_square()?.f_mul_scalar(1.0 - rho)?)?;
                let std = sq.f_add_scalar(eps)?.f_sqrt_()?;
                let delta = acc.f_add_scalar(eps)?.f_sqrt_()?.f_div_(&std)?.f_mul_(&g)?;
                let _ = p.f_sub_(&delta.f_mul_scalar(lr)?)?;
                let _ = acc.f_mul_scalar_(rho)?.f_add_(&delta.f_square()?.f_mul_scalar(1.0 - rho)?)?;
            }
            Ok(())
        })
    }
}

/// Images per forward pass in [`evaluate`]: large enough to amortise the
/// per-call overhead, small enough that the activations stay in cache-friendly
/// sizes and do not raise the run's peak memory.
const EVAL_BATCH: i64 = 250;

/// Test-set accuracy, mean loss, per-class accuracy and the confusion matrix
/// (`confusion[true][predicted]`), computed without autograd in large batches.
///
/// # Errors
/// A libtorch error.
pub fn evaluate(net: &Net, images: &Tensor, labels: &Tensor) -> Result<ModelMetrics, TchError> {
    let _guard = tch::no_grad_guard();
    let n = images.size()[0];
    let device = images.device();
    let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device))?;
    let mut confusion = Tensor::f_zeros([100], (Kind::Int64, device))?;
    let batch = EVAL_BATCH;
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let xs = crate::data::pixels(&images.f_narrow(0, start, len)?)?;
        let ys = labels.f_narrow(0, start, len)?;
        let out = net.forward_t(&xs, false);
        let loss = out.f_nll_loss::<Tensor>(&ys, None, tch::Reduction::Sum, -100)?;
        let _ = loss_sum.f_add_(&loss.f_to_kind(Kind::Double)?)?;
        let pred = out.f_argmax(-1, false)?;
        let cells = ys.f_mul_scalar(10)?.f_add(&pred)?;
        let _ = confusion.f_add_(&cells.f_bincount::<Tensor>(None, 100)?)?;
        start += len;
    }
    let counts: Vec<i64> = Vec::<i64>::try_from(confusion.f_to_device(Device::Cpu)?)?;
    let matrix: Vec<Vec<u64>> =
        counts.chunks(10).map(|row| row.iter().map(|c| u64::try_from(*c).unwrap_or(0)).collect()).collect();
    let correct: u64 = (0..10).map(|i| matrix[i][i]).sum();
    let per_class_accuracy = (0..10)
        .map(|i| {
            let total: u64 = matrix[i].iter().sum();
            if total == 0 { 0.0 } else { matrix[i][i] as f64 / total as f64 }
        })
        .collect();
    Ok(ModelMetrics {
        accuracy: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        loss: if n == 0 { 0.0 } else { loss_sum.f_double_value(&[])? / n as f64 },
        per_class_accuracy,
        confusion: matrix,
    })
}

/// Exports the trained network as TorchScript (traced on the CPU, so it loads
/// anywhere, in eval mode: no dropout) and returns the file's bytes. The export
/// is loaded back and checked against the network on `check_images` before it is
/// returned.
///
/// # Errors
/// Tracing, saving or the round-trip check fails.
pub fn export_torchscript(trained: &mut Trained, check_images: &Tensor) -> Result<Vec<u8>, TchError> {
    trained.vs.set_device(Device::Cpu);
    trained.vs.freeze();
    let net = &trained.net;
    let example = Tensor::f_zeros([1, 1, 28, 28], (Kind::Float, Device::Cpu))?;
    let module = tch::CModule::create_by_tracing("MnistNet", "forward", &[example], &mut |inputs| {
        vec![net.forward_t(&inputs[0], false)]
    })?;
    let dir = tempfile::tempdir().map_err(|e| TchError::FileFormat(format!("temporary directory: {e}")))?;
    let path = dir.path().join("model.pt");
    module.save(&path)?;
    let bytes = std::fs::read(&path).map_err(|e| TchError::FileFormat(format!("reading {}: {e}", path.display())))?;

    let reloaded = tch::CModule::load_data(&mut bytes.as_slice())?;
    let _guard = tch::no_grad_guard();
    let xs = check_images.f_to_device(Device::Cpu)?;
    let expected = net.forward_t(&xs, false);
    let actual = reloaded.forward_ts(&[&xs])?;
    let diff = expected.f_sub(&actual)?.f_abs()?.f_max()?.f_double_value(&[])?;
    if diff.is_nan() || diff >= 1e-3 {
        return Err(TchError::FileFormat(format!("exported TorchScript disagrees with the network by {diff}")));
    }
    Ok(bytes)
}
