//! Turning an upload into the model's input: what MNIST itself did to its scans.
//!
//! 1. Decode with limits set *before* decoding: the header's dimensions are checked
//!    against [`Limits`], and the decode's memory is estimated from the header and
//!    reserved from the process's [`DecodeBudget`], before a pixel buffer is
//!    allocated (decompression bombs are refused, not decoded; a full budget is
//!    "busy", not an out-of-memory kill). Decoding goes straight to 8-bit luma
//!    where the codec allows (PNG streamed row by row, JPEG as its Y plane) and is
//!    area-averaged into the work image as rows arrive: no 16-bit RGBA
//!    intermediate, no second full-size copy.
//! 2. Grayscale; transparency is composited onto the colour that contrasts with the
//!    ink (a browser canvas exports black *or* white strokes on transparent pixels).
//! 3. Polarity: the border's median tells the background; MNIST is white on black,
//!    so a light background is inverted.
//! 4. Contrast: background level and noise come from the border (median and MAD),
//!    the ink level from the brightest pixels; everything is mapped onto `[0, 1]`.
//! 5. Crop to the ink: connected components of the ink mask, small specks and far
//!    away noise dropped, bounding box of the rest.
//! 6. Scale to fit 20×20 keeping the aspect ratio (anti-aliased), and place in 28×28
//!    with the centre of mass at the centre.
//!
//! A 28×28 image is taken as already MNIST-shaped: only its polarity is fixed.
//! Large images are area-averaged down to [`WORK_SIZE`] first, so the cost of the
//! later steps is bounded whatever the upload.

use std::io::Cursor;
use std::sync::Arc;

use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageError, ImageFormat, ImageReader, Luma};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;

/// Side of the model's input.
pub const SIDE: usize = 28;
/// Pixels of the model's input.
pub const PIXELS: usize = SIDE * SIDE;
/// The box the digit is scaled into (MNIST: 20×20).
pub const FIT: f32 = 20.0;
/// Larger images are area-averaged down to at most this many pixels per side
/// before the analysis (a digit stays well above 20 px unless it covers less
/// than a twentieth of the page).
pub const WORK_SIZE: u32 = 512;

/// One preprocessed image: `[28 × 28]` intensities in `[0, 1]`, white on black.
pub type Pixels = [f32; PIXELS];

/// Why an upload cannot be classified. [`PreprocessError::status`] gives the HTTP code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreprocessError {
    #[error("empty body: send an image")]
    Empty,
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge { size: u64, limit: u64 },
    #[error("unsupported or unknown image type{0}")]
    Unsupported(String),
    #[error("image too large: {0}")]
    TooLarge(String),
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    #[error("busy: the images being decoded fill this instance's memory budget; retry shortly")]
    Busy,
}

impl PreprocessError {
    /// The HTTP status (also the `code` of a NATS error reply).
    pub fn status(&self) -> u16 {
        match self {
            Self::Empty => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::Unsupported(_) => 415,
            Self::TooLarge(_) | Self::Corrupt(_) => 422,
            Self::Busy => 503,
        }
    }
}

fn from_image_error(e: ImageError) -> PreprocessError {
    match e {
        ImageError::Limits(l) => PreprocessError::TooLarge(l.to_string()),
        ImageError::Unsupported(u) => PreprocessError::Unsupported(format!(": {u}")),
        other => PreprocessError::Corrupt(other.to_string()),
    }
}

/// Decodes `bytes` (PNG, JPEG, GIF, BMP, WebP, TIFF; or, when `raw_ok`, exactly 784
/// raw bytes of a 28×28 MNIST-polarity image) and prepares it for the model.
///
/// # Errors
/// Empty, too large, of an unknown type, corrupt or truncated; see [`PreprocessError`].
pub fn prepare(bytes: &[u8], limits: &Limits, raw_ok: bool) -> Result<Pixels, PreprocessError> {
    prepare_within(bytes, limits, raw_ok, &DecodeBudget::new(limits.decode_budget_bytes))
}

/// [`prepare`] with the decode memory reserved from a shared `budget`.
///
/// # Errors
/// See [`prepare`]; [`PreprocessError::Busy`] when `budget` cannot hold the decode now.
pub fn prepare_within(
    bytes: &[u8],
    limits: &Limits,
    raw_ok: bool,
    budget: &DecodeBudget,
) -> Result<Pixels, PreprocessError> {
    let gray = decode(bytes, limits, raw_ok, budget)?;
    Ok(normalise(&gray))
}

/// The dimensions an upload declares in its header, without decoding its pixels
/// (`None` when the content is not a recognised image or its header is broken).
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

/// A grayscale work image in `[0, 1]` (row-major), ink not yet normalised.
#[derive(Debug, Clone)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// The memory all decodes of one process may hold at once, in bytes, shared by
/// the HTTP and NATS routes.
///
/// Every decode estimates its peak from the image's header (format, width,
/// height, colour type) *before* it allocates pixels and reserves that much;
/// an image whose estimate exceeds the whole budget is refused (422), and one
/// that does not fit in what is left now is answered [`PreprocessError::Busy`]
/// (503 with `Retry-After`), never queued in memory.
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    permits: Arc<Semaphore>,
    kib: u32,
}

/// The budget held by one decode; released on drop.
#[derive(Debug)]
pub struct Reservation(#[allow(dead_code)] OwnedSemaphorePermit);

impl DecodeBudget {
    /// A budget of `bytes` (rounded up to KiB; at most 4 TiB).
    pub fn new(bytes: u64) -> Self {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).max(1);
        Self { permits: Arc::new(Semaphore::new(kib as usize)), kib }
    }

    /// The whole budget in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.kib) * 1024
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * 1024
    }

    /// Reserves `bytes` without waiting.
    ///
    /// # Errors
    /// [`PreprocessError::TooLarge`] when `bytes` exceeds the whole budget,
    /// [`PreprocessError::Busy`] when it does not fit in what is left now.
    pub fn reserve(&self, bytes: u64, what: &str) -> Result<Reservation, PreprocessError> {
        let kib = bytes.div_ceil(1024).max(1);
        if kib > u64::from(self.kib) {
            return Err(PreprocessError::TooLarge(format!(
                "decoding {what} needs about {} MiB, more than this instance's decode budget of {} MiB",
                bytes.div_ceil(1 << 20),
                self.bytes() >> 20
            )));
        }
        match self.permits.clone().try_acquire_many_owned(kib as u32) {
            Ok(permit) => Ok(Reservation(permit)),
            Err(_) => Err(PreprocessError::Busy),
        }
    }
}

/// What a decode of a `w`×`h` image holds besides the pixels it is asked for:
/// the shrinker's accumulators (12 bytes a work pixel), and 1 MiB for the
/// decoders' own state (zlib's window, Huffman tables, rows in flight).
fn overhead(w: u32, h: u32) -> u64 {
    let (nw, nh) = work_size(w, h);
    (1 << 20) + u64::from(nw) * u64::from(nh) * 12
}

/// The work image's size: at most [`WORK_SIZE`] a side, the aspect ratio kept.
fn work_size(w: u32, h: u32) -> (u32, u32) {
    if w.max(h) > WORK_SIZE {
        let s = f64::from(WORK_SIZE) / f64::from(w.max(h));
        (((f64::from(w) * s).round() as u32).max(1), ((f64::from(h) * s).round() as u32).max(1))
    } else {
        (w, h)
    }
}

/// Steps 1–2: decode within `limits` and `budget`, composite alpha, grayscale,
/// shrink to [`WORK_SIZE`].
///
/// Only the first frame of an animated image (GIF, APNG, animated WebP) is
/// decoded: the default image of an APNG, the first frame of the others on
/// their logical screen. Later frames are never read.
///
/// # Errors
/// See [`prepare`]; [`PreprocessError::Busy`] when `budget` cannot hold the
/// decode now.
pub fn decode(bytes: &[u8], limits: &Limits, raw_ok: bool, budget: &DecodeBudget) -> Result<Gray, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() as u64 > limits.max_body_bytes {
        return Err(PreprocessError::BodyTooLarge { size: bytes.len() as u64, limit: limits.max_body_bytes });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    match reader.format() {
        None => {
            if raw_ok && bytes.len() == PIXELS {
                let data = bytes.iter().map(|&b| f32::from(b) / 255.0).collect();
                return Ok(Gray { width: SIDE, height: SIDE, data });
            }
            Err(PreprocessError::Unsupported(
                " (send PNG, JPEG, GIF, BMP, WebP or TIFF; the content was not recognised as any)".into(),
            ))
        }
        Some(ImageFormat::Png) => decode_png(bytes, limits, budget),
        Some(ImageFormat::Jpeg) => decode_jpeg(bytes, limits, budget),
        Some(_) => decode_other(reader, limits, budget),
    }
}

fn check_size(w: u32, h: u32, limits: &Limits) -> Result<(), PreprocessError> {
    if w == 0 || h == 0 {
        return Err(PreprocessError::Corrupt(format!("image has no pixels ({w}×{h})")));
    }
    if w > limits.max_dimension || h > limits.max_dimension {
        return Err(PreprocessError::TooLarge(format!(
            "{w}×{h}: a side exceeds the limit of {} pixels",
            limits.max_dimension
        )));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(PreprocessError::TooLarge(format!(
            "{w}×{h} = {} pixels exceeds the limit of {} pixels",
            u64::from(w) * u64::from(h),
            limits.max_pixels
        )));
    }
    Ok(())
}

fn png_error(e: png::DecodingError) -> PreprocessError {
    match e {
        png::DecodingError::LimitsExceeded => PreprocessError::TooLarge("the PNG exceeds the decode budget".into()),
        other => PreprocessError::Corrupt(other.to_string()),
    }
}

/// PNG through the `png` crate, reduced to 8 bits per sample while decoding (no
/// 16-bit intermediate). A non-interlaced image is streamed row by row into the
/// shrinker (memory: a few rows); an interlaced one needs its whole 8-bit frame.
fn decode_png(bytes: &[u8], limits: &Limits, budget: &DecodeBudget) -> Result<Gray, PreprocessError> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    decoder.set_limits(png::Limits { bytes: usize::try_from(budget.bytes()).unwrap_or(usize::MAX) });
    let info = decoder.read_header_info().map_err(png_error)?;
    let (w, h, interlaced) = (info.width, info.height, info.interlaced);
    check_size(w, h, limits)?;
    let mut reader = decoder.read_info().map_err(png_error)?;
    let (color, _) = reader.output_color_type();
    let channels = color.samples();
    let line = reader.output_line_size(w).ok_or_else(|| PreprocessError::TooLarge("PNG rows too long".into()))? as u64;
    let frame = if interlaced { line * u64::from(h) } else { 0 };
    let _reservation = budget.reserve(frame + 4 * line + overhead(w, h), "this PNG")?;
    let alpha = matches!(color, png::ColorType::GrayscaleAlpha | png::ColorType::Rgba);
    let mut shrink = Shrinker::new(w, h, alpha);
    let mut feed = |y: u32, row: &[u8]| {
        shrink.row(
            y,
            row.chunks_exact(channels).map(|p| match p {
                [l] => (*l, 255),
                [l, a] => (*l, *a),
                [r, g, b] => (luma(*r, *g, *b), 255),
                [r, g, b, a] => (luma(*r, *g, *b), *a),
                _ => (0, 0),
            }),
        );
    };
    if interlaced {
        let mut buf = vec![0u8; line as usize * h as usize];
        reader.next_frame(&mut buf).map_err(png_error)?;
        for (y, row) in buf.chunks_exact(line as usize).enumerate() {
            feed(y as u32, row);
        }
    } else {
        for y in 0..h {
            let row = reader
                .next_row()
                .map_err(png_error)?
                .ok_or_else(|| PreprocessError::Corrupt(format!("the PNG ends after {y} of {h} rows")))?;
            feed(y, row.data());
        }
    }
    Ok(shrink.finish())
}

/// JPEG through `zune-jpeg`, asking it for luma only (the Y plane: no colour
/// conversion, no RGB buffer). zune-jpeg cannot scale while decoding (no
/// reduced-size IDCT), so a progressive JPEG holds its coefficients (2 bytes a
/// sample) for the whole image; the estimate counts them.
fn decode_jpeg(bytes: &[u8], limits: &Limits, budget: &DecodeBudget) -> Result<Gray, PreprocessError> {
    use zune_core::colorspace::ColorSpace;
    let jpeg_error = |e: zune_jpeg::errors::DecodeErrors| PreprocessError::Corrupt(format!("JPEG: {e}"));
    let options = zune_core::options::DecoderOptions::default()
        // Sides are checked below against the limits, as for every format.
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX))
        .set_strict_mode(false)
        .jpeg_set_out_colorspace(ColorSpace::Luma);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(jpeg_error)?;
    let info = decoder.info().ok_or_else(|| PreprocessError::Corrupt("JPEG without a frame header".into()))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_size(w, h, limits)?;
    if !matches!(decoder.input_colorspace(), Some(ColorSpace::YCbCr | ColorSpace::Luma)) {
        // CMYK and other rare kinds: the generic path, which converts through RGB.
        let reader = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg);
        return decode_other(reader, limits, budget);
    }
    // Blocks are padded to 16 pixels; output is one byte a pixel.
    let padded = u64::from(w.div_ceil(16) * 16) * u64::from(h.div_ceil(16) * 16);
    let coefficients = if info.sof.is_sequential_dct() { 0 } else { padded * 2 * u64::from(info.components) };
    let _reservation = budget.reserve(padded + coefficients + overhead(w, h), "this JPEG")?;
    let luma = decoder.decode().map_err(jpeg_error)?;
    let mut shrink = Shrinker::new(w, h, false);
    for (y, row) in luma.chunks_exact(w as usize).take(h as usize).enumerate() {
        shrink.row(y as u32, row.iter().map(|&l| (l, 255)));
    }
    Ok(shrink.finish())
}

/// GIF, BMP, WebP, TIFF (and JPEGs that are not YCbCr) through `image`'s
/// decoders: the native pixel buffer is the one full-size copy; it is read
/// into the shrinker a band of rows at a time.
fn decode_other(
    reader: ImageReader<Cursor<&[u8]>>,
    limits: &Limits,
    budget: &DecodeBudget,
) -> Result<Gray, PreprocessError> {
    let mut reader = reader;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_dimension);
    decoder_limits.max_image_height = Some(limits.max_dimension);
    decoder_limits.max_alloc = Some(budget.bytes());
    reader.limits(decoder_limits.clone());
    let mut decoder = reader.into_decoder().map_err(from_image_error)?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, limits)?;
    // The decoders' own buffers (a GIF frame that does not match its screen, WebP's
    // planes, TIFF strips) are allowed as much again as the output, no more: the
    // decoder refuses to allocate past the reservation.
    let native = decoder.total_bytes();
    let estimate = native.saturating_mul(2).saturating_add(overhead(w, h));
    let _reservation = budget.reserve(estimate, "this image")?;
    decoder_limits.max_alloc = Some(estimate);
    decoder.set_limits(decoder_limits).map_err(from_image_error)?;
    let image = DynamicImage::from_decoder(decoder).map_err(from_image_error)?;
    let mut shrink = Shrinker::new(w, h, image.color().has_alpha());
    const BAND: u32 = 64;
    for y0 in (0..h).step_by(BAND as usize) {
        let band = image.crop_imm(0, y0, w, BAND.min(h - y0)).to_luma_alpha8();
        for (dy, row) in band.as_raw().chunks_exact(2 * w as usize).enumerate() {
            shrink.row(y0 + dy as u32, row.chunks_exact(2).map(|p| (p[0], p[1])));
        }
    }
    Ok(shrink.finish())
}

/// Rec. 709 luma, as `image` computes it for 8-bit RGB.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((2126 * u32::from(r) + 7152 * u32::from(g) + 722 * u32::from(b)) / 10_000) as u8
}

/// Area-averages rows of (luma, alpha) into at most [`WORK_SIZE`] per side as they
/// arrive, so no full-size grayscale copy exists; then composites alpha onto the
/// colour that contrasts with the ink.
struct Shrinker {
    w: u32,
    h: u32,
    nw: u32,
    nh: u32,
    alpha: bool,
    luma: Vec<f32>,
    opacity: Vec<f32>,
    count: Vec<u32>,
}

impl Shrinker {
    fn new(w: u32, h: u32, alpha: bool) -> Self {
        let (nw, nh) = work_size(w, h);
        let n = nw as usize * nh as usize;
        Self { w, h, nw, nh, alpha, luma: vec![0.0; n], opacity: vec![0.0; n], count: vec![0; n] }
    }

    fn row(&mut self, y: u32, pixels: impl Iterator<Item = (u8, u8)>) {
        if y >= self.h {
            return;
        }
        let ty = (u64::from(y) * u64::from(self.nh) / u64::from(self.h)) as usize;
        let base = ty * self.nw as usize;
        for (x, (l, a)) in pixels.take(self.w as usize).enumerate() {
            let tx = (x as u64 * u64::from(self.nw) / u64::from(self.w)) as usize;
            let i = base + tx;
            self.luma[i] += f32::from(l);
            self.opacity[i] += f32::from(a);
            self.count[i] += 1;
        }
    }

    fn finish(self) -> Gray {
        let pixels: Vec<(f32, f32)> = self
            .luma
            .iter()
            .zip(&self.opacity)
            .zip(&self.count)
            .map(|((&l, &a), &n)| {
                let n = n.max(1) as f32 * 255.0;
                // Unreached cells (a truncated band) stay transparent black.
                (l / n, a / n)
            })
            .collect();
        let (width, height) = (self.nw as usize, self.nh as usize);
        if !self.alpha {
            return Gray { width, height, data: pixels.iter().map(|&(l, _)| l).collect() };
        }
        let transparent = pixels.iter().any(|&(_, a)| a < 0.98);
        let background = if transparent {
            // The colour of the (partly) opaque pixels is the ink's: composite onto its opposite.
            let (sum, weight) =
                pixels.iter().fold((0.0f64, 0.0f64), |(s, wt), &(l, a)| (s + f64::from(l * a), wt + f64::from(a)));
            let ink = if weight > 0.0 { sum / weight } else { 0.0 };
            if ink < 0.5 { 1.0 } else { 0.0 }
        } else {
            0.0
        };
        let data = pixels.iter().map(|&(l, a)| l * a + background * (1.0 - a)).collect();
        Gray { width, height, data }
    }
}

/// The value at quantile `q` in `[0, 1]` (reorders `v`).
fn quantile(v: &mut [f32], q: f32) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let k = ((v.len() - 1) as f32 * q).round() as usize;
    *v.select_nth_unstable_by(k, f32::total_cmp).1
}

/// Steps 3–6 on a decoded work image.
pub fn normalise(gray: &Gray) -> Pixels {
    let (w, h) = (gray.width, gray.height);
    let mut v = gray.data.clone();
    // Background and its noise from the border ring (about 5 % of the short side).
    let ring = (w.min(h) / 20).max(1);
    let mut border: Vec<f32> = Vec::with_capacity(2 * ring * (w + h));
    for y in 0..h {
        for x in 0..w {
            if x < ring || y < ring || x >= w - ring.min(w) || y >= h - ring.min(h) {
                border.push(v[y * w + x]);
            }
        }
    }
    let mut background = quantile(&mut border, 0.5);
    if background > 0.5 {
        v.iter_mut().for_each(|p| *p = 1.0 - *p);
        border.iter_mut().for_each(|p| *p = 1.0 - *p);
        background = 1.0 - background;
    }
    let mut out = [0.0f32; PIXELS];
    if w == SIDE && h == SIDE {
        // Already MNIST-shaped (the format of the data set itself): keep it as it is.
        out.copy_from_slice(&v);
        return out;
    }
    let mut deviations: Vec<f32> = border.iter().map(|p| (p - background).abs()).collect();
    let sigma = 1.4826 * quantile(&mut deviations, 0.5);
    let floor = background + (4.0 * sigma).max(0.1);
    let mut bright: Vec<f32> = v.iter().copied().filter(|&p| p > floor).collect();
    if bright.is_empty() {
        return out; // No ink at all: a blank input stays blank.
    }
    let ink = quantile(&mut bright, 0.9).max(floor + 0.1);
    // Map the range [background + noise, ink] onto [0, 1].
    let low = background + (2.5 * sigma).max(0.05);
    let n: Vec<f32> = v.iter().map(|&p| ((p - low) / (ink - low)).clamp(0.0, 1.0)).collect();
    let Some((x0, y0, x1, y1, n)) = crop_to_ink(n, w, h) else {
        return out;
    };
    let (cw, ch) = (x1 - x0 + 1, y1 - y0 + 1);
    let mut crop = ImageBuffer::<Luma<f32>, Vec<f32>>::new(cw as u32, ch as u32);
    for y in 0..ch {
        for x in 0..cw {
            crop.put_pixel(x as u32, y as u32, Luma([n[(y0 + y) * w + x0 + x]]));
        }
    }
    let scale = FIT / cw.max(ch) as f32;
    let nw = ((cw as f32 * scale).round() as u32).clamp(1, FIT as u32);
    let nh = ((ch as f32 * scale).round() as u32).clamp(1, FIT as u32);
    let fitted = image::imageops::resize(&crop, nw, nh, FilterType::Triangle);
    let max = fitted.as_raw().iter().copied().fold(0.0f32, f32::max);
    if max <= 0.0 {
        return out;
    }
    // Centre of mass, then an integer shift that puts it at the centre of 28×28.
    let (mut mass, mut mx, mut my) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y, p) in fitted.enumerate_pixels() {
        let p = f64::from(p.0[0]);
        mass += p;
        mx += p * f64::from(x);
        my += p * f64::from(y);
    }
    let centre = (SIDE as f64 - 1.0) / 2.0;
    let ox = (centre - mx / mass).round() as i64;
    let oy = (centre - my / mass).round() as i64;
    for (x, y, p) in fitted.enumerate_pixels() {
        let (tx, ty) = (i64::from(x) + ox, i64::from(y) + oy);
        if (0..SIDE as i64).contains(&tx) && (0..SIDE as i64).contains(&ty) {
            out[ty as usize * SIDE + tx as usize] = (p.0[0] / max).clamp(0.0, 1.0);
        }
    }
    out
}

/// The bounding box of the digit's ink (inclusive) and the image with dropped
/// components blanked, or `None` when there is no ink.
///
/// Ink is `n > 0.35`; 8-connected components smaller than 5 % of the largest are
/// specks, and components far from the largest are noise unless they are big.
#[allow(clippy::type_complexity)]
fn crop_to_ink(mut n: Vec<f32>, w: usize, h: usize) -> Option<(usize, usize, usize, usize, Vec<f32>)> {
    const INK: f32 = 0.35;
    let mut label = vec![0u32; w * h];
    struct Component {
        area: usize,
        x0: usize,
        y0: usize,
        x1: usize,
        y1: usize,
    }
    let mut components: Vec<Component> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if n[start] <= INK || label[start] != 0 {
            continue;
        }
        let id = components.len() as u32 + 1;
        let mut c = Component { area: 0, x0: usize::MAX, y0: usize::MAX, x1: 0, y1: 0 };
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            c.area += 1;
            c.x0 = c.x0.min(x);
            c.x1 = c.x1.max(x);
            c.y0 = c.y0.min(y);
            c.y1 = c.y1.max(y);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if label[j] == 0 && n[j] > INK {
                        label[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
        components.push(c);
    }
    let main = components.iter().max_by_key(|c| c.area)?;
    let (main_area, mx0, my0, mx1, my1) = (main.area, main.x0, main.y0, main.x1, main.y1);
    let reach = (mx1 - mx0).max(my1 - my0) as i64 / 2 + 2;
    let keep: Vec<bool> = components
        .iter()
        .map(|c| {
            if c.area * 20 < main_area {
                return false;
            }
            let gap_x = (c.x0 as i64 - mx1 as i64).max(mx0 as i64 - c.x1 as i64).max(0);
            let gap_y = (c.y0 as i64 - my1 as i64).max(my0 as i64 - c.y1 as i64).max(0);
            gap_x.max(gap_y) <= reach || c.area * 3 >= main_area
        })
        .collect();
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (c, _) in components.iter().zip(&keep).filter(|(_, k)| **k) {
        x0 = x0.min(c.x0);
        y0 = y0.min(c.y0);
        x1 = x1.max(c.x1);
        y1 = y1.max(c.y1);
    }
    for (p, &l) in n.iter_mut().zip(&label) {
        if l != 0 && !keep[l as usize - 1] {
            *p = 0.0;
        }
    }
    Some((x0, y0, x1, y1, n))
}

#[cfg(test)]
mod tests {
    use image::GrayImage;

    use super::*;

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    /// A 1-pixel-wide "digit": a vertical bar of dark ink on a white page.
    fn bar_on_white(w: u32, h: u32, x: u32) -> DynamicImage {
        let mut img = GrayImage::from_pixel(w, h, Luma([255]));
        for y in h / 4..3 * h / 4 {
            for dx in 0..(w / 20).max(1) {
                img.put_pixel(x + dx, y, Luma([0]));
            }
        }
        DynamicImage::ImageLuma8(img)
    }

    fn centre_of_mass(p: &Pixels) -> (f32, f32) {
        let (mut m, mut x, mut y) = (0.0, 0.0, 0.0);
        for (i, v) in p.iter().enumerate() {
            m += v;
            x += v * (i % SIDE) as f32;
            y += v * (i / SIDE) as f32;
        }
        (x / m, y / m)
    }

    #[test]
    fn an_off_centre_dark_bar_on_white_becomes_a_centred_white_bar_twenty_pixels_high() {
        let out = prepare(&png(&bar_on_white(300, 200, 30)), &Limits::default(), false).unwrap();
        let (cx, cy) = centre_of_mass(&out);
        assert!((cx - 13.5).abs() <= 1.0 && (cy - 13.5).abs() <= 1.0, "centre of mass at ({cx}, {cy})");
        let rows_with_ink = (0..SIDE).filter(|y| (0..SIDE).any(|x| out[y * SIDE + x] > 0.5)).count();
        assert!((19..=21).contains(&rows_with_ink), "{rows_with_ink} rows of ink");
        assert_eq!(out[0], 0.0, "background must be black");
    }

    #[test]
    fn mnist_shaped_images_pass_through_and_inverted_ones_are_flipped() {
        let mut img = GrayImage::new(28, 28);
        img.put_pixel(10, 12, Luma([255]));
        let out = prepare(&png(&DynamicImage::ImageLuma8(img.clone())), &Limits::default(), false).unwrap();
        assert_eq!(out[12 * SIDE + 10], 1.0);
        image::imageops::invert(&mut img);
        let out = prepare(&png(&DynamicImage::ImageLuma8(img)), &Limits::default(), false).unwrap();
        assert_eq!(out[12 * SIDE + 10], 1.0);
        assert_eq!(out[0], 0.0);
    }

    #[test]
    fn errors_map_to_their_statuses() {
        let limits = Limits::default();
        assert_eq!(prepare(b"", &limits, false).unwrap_err().status(), 400);
        assert_eq!(prepare(b"hello, this is text", &limits, false).unwrap_err().status(), 415);
        let good = png(&bar_on_white(40, 40, 5));
        assert_eq!(prepare(&good[..good.len() / 2], &limits, false).unwrap_err().status(), 422);
        let tiny = Limits { max_body_bytes: 10, ..limits };
        assert_eq!(prepare(&good, &tiny, false).unwrap_err().status(), 413);
        let few = Limits { max_pixels: 100, ..limits };
        assert_eq!(prepare(&good, &few, false).unwrap_err().status(), 422);
    }

    #[test]
    fn raw_pixels_are_accepted_only_when_allowed() {
        let raw = [0u8; PIXELS];
        assert!(prepare(&raw, &Limits::default(), true).is_ok());
        assert_eq!(prepare(&raw, &Limits::default(), false).unwrap_err().status(), 415);
    }
}
