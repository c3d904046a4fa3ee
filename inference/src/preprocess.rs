//! Turning an upload into the model's input: what MNIST itself did to its scans.
//!
//! 1. Decode with limits set *before* decoding: the header's dimensions are checked
//!    against [`Limits`] before a pixel buffer is allocated (decompression bombs are
//!    refused, not decoded).
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

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageError, ImageReader, Luma};

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
}

impl PreprocessError {
    /// The HTTP status (also the `code` of a NATS error reply).
    pub fn status(&self) -> u16 {
        match self {
            Self::Empty => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::Unsupported(_) => 415,
            Self::TooLarge(_) | Self::Corrupt(_) => 422,
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
    let gray = decode(bytes, limits, raw_ok)?;
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

/// Steps 1–2: decode with limits, composite alpha, grayscale, shrink to [`WORK_SIZE`].
///
/// # Errors
/// See [`prepare`].
pub fn decode(bytes: &[u8], limits: &Limits, raw_ok: bool) -> Result<Gray, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() as u64 > limits.max_body_bytes {
        return Err(PreprocessError::BodyTooLarge { size: bytes.len() as u64, limit: limits.max_body_bytes });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        if raw_ok && bytes.len() == PIXELS {
            let data = bytes.iter().map(|&b| f32::from(b) / 255.0).collect();
            return Ok(Gray { width: SIDE, height: SIDE, data });
        }
        return Err(PreprocessError::Unsupported(
            " (send PNG, JPEG, GIF, BMP, WebP or TIFF; the content was not recognised as any)".into(),
        ));
    }
    let mut reader = reader;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_dimension);
    decoder_limits.max_image_height = Some(limits.max_dimension);
    // Worst case: 16-bit RGBA output plus the decoder's own buffers.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    let decoder = reader.into_decoder().map_err(from_image_error)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(PreprocessError::Corrupt(format!("image has no pixels ({w}×{h})")));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(PreprocessError::TooLarge(format!(
            "{w}×{h} = {} pixels exceeds the limit of {} pixels",
            u64::from(w) * u64::from(h),
            limits.max_pixels
        )));
    }
    let image = DynamicImage::from_decoder(decoder).map_err(from_image_error)?;
    Ok(to_gray(&image))
}

/// Grayscale with alpha composited onto the colour that contrasts with the ink,
/// shrunk (area average) to at most [`WORK_SIZE`] per side.
fn to_gray(image: &DynamicImage) -> Gray {
    let (w, h) = (image.width(), image.height());
    let (nw, nh) = if w.max(h) > WORK_SIZE {
        let s = f64::from(WORK_SIZE) / f64::from(w.max(h));
        (((f64::from(w) * s).round() as u32).max(1), ((f64::from(h) * s).round() as u32).max(1))
    } else {
        (w, h)
    };
    if image.color().has_alpha() {
        let la = image.to_luma_alpha8();
        let la = if (nw, nh) == (w, h) { la } else { image::imageops::thumbnail(&la, nw, nh) };
        let pixels: Vec<(f32, f32)> =
            la.pixels().map(|p| (f32::from(p.0[0]) / 255.0, f32::from(p.0[1]) / 255.0)).collect();
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
        Gray { width: nw as usize, height: nh as usize, data }
    } else {
        let g: GrayImage = image.to_luma8();
        let g = if (nw, nh) == (w, h) { g } else { image::imageops::thumbnail(&g, nw, nh) };
        let data = g.as_raw().iter().map(|&b| f32::from(b) / 255.0).collect();
        Gray { width: nw as usize, height: nh as usize, data }
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
