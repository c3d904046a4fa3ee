//! The preprocessing accuracy floor: MNIST test digits turned into the uploads
//! people really send (scans, photos, colour, a digit on a noisy page, canvas
//! exports, large images), classified by a properly trained model after our
//! preprocessing, per category. The naive resize-to-28×28 baseline is printed
//! beside it (the README quotes both).

mod common;

use std::io::Cursor;

use common::{digit, encode, label, trained_model};
use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use mnistflow_inference::config::Limits;
use mnistflow_inference::model::{Model, most_likely};
use mnistflow_inference::preprocess::{self, PIXELS, Pixels};
use mnistflow_nats::ModelVersion;
use mnistflow_torch::Precision;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Digits per category (spread over the whole test set).
const PER_CATEGORY: usize = 300;
/// The floor the issue sets for every category.
const FLOOR: f64 = 0.97;

fn gaussian(rng: &mut StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.random_range(1e-6..1.0), rng.random_range(0.0..1.0));
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// The digit upscaled `k` times (bilinear), as ink intensity in [0, 1].
fn ink(i: usize, k: u32) -> GrayImage {
    imageops::resize(&digit(i), 28 * k, 28 * k, FilterType::Triangle)
}

/// `ink` laid onto paper: `paper` where there is no ink, `pen` where it is full.
fn on_paper(ink: &GrayImage, paper: [f32; 3], pen: [f32; 3]) -> RgbImage {
    RgbImage::from_fn(ink.width(), ink.height(), |x, y| {
        let a = f32::from(ink.get_pixel(x, y).0[0]) / 255.0;
        Rgb(std::array::from_fn(|c| (paper[c] * (1.0 - a) + pen[c] * a).round() as u8))
    })
}

fn add_noise(img: &mut RgbImage, rng: &mut StdRng, sigma: f32) {
    for p in img.pixels_mut() {
        let n = gaussian(rng) * sigma;
        for c in &mut p.0 {
            *c = (f32::from(*c) + n).clamp(0.0, 255.0) as u8;
        }
    }
}

/// One way people send digits; returns the encoded upload.
type Category = (&'static str, fn(usize, &mut StdRng) -> Vec<u8>);

fn categories() -> Vec<Category> {
    vec![
        ("MNIST-format PNG (28×28, white on black)", |i, _| {
            encode(&DynamicImage::ImageLuma8(digit(i)), ImageFormat::Png)
        }),
        ("inverted scan (black on white, 112×112 PNG)", |i, _| {
            let img = on_paper(&ink(i, 4), [235.0; 3], [25.0; 3]);
            encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png)
        }),
        ("photo as JPEG with artefacts (140×140, noise, quality 40)", |i, rng| {
            let mut img = on_paper(&ink(i, 5), [225.0, 222.0, 215.0], [40.0; 3]);
            add_noise(&mut img, rng, 6.0);
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), 40)
                .encode_image(&DynamicImage::ImageRgb8(img))
                .unwrap();
            out
        }),
        ("colour (blue ink on yellow paper, 112×112 JPEG)", |i, _| {
            let img = on_paper(&ink(i, 4), [250.0, 240.0, 170.0], [20.0, 40.0, 160.0]);
            encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
        }),
        ("off-centre on a noisy 400×300 page with specks (JPEG)", |i, rng| {
            let mut page = RgbImage::from_pixel(400, 300, Rgb([228, 226, 220]));
            let k = rng.random_range(2..=4u32);
            let glyph = ink(i, k);
            let (x0, y0) = (rng.random_range(0..400 - glyph.width()), rng.random_range(0..300 - glyph.height()));
            for (x, y, p) in glyph.enumerate_pixels() {
                let a = f32::from(p.0[0]) / 255.0;
                let q = page.get_pixel_mut(x0 + x, y0 + y);
                q.0 = q.0.map(|c| (f32::from(c) * (1.0 - a) + 30.0 * a) as u8);
            }
            for _ in 0..25 {
                let (sx, sy) = (rng.random_range(0..398), rng.random_range(0..298));
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    page.put_pixel(sx + dx, sy + dy, Rgb([60, 60, 60]));
                }
            }
            add_noise(&mut page, rng, 8.0);
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), 80)
                .encode_image(&DynamicImage::ImageRgb8(page))
                .unwrap();
            out
        }),
        ("browser canvas (280×280 RGBA, transparent, thick strokes)", |i, _| {
            // Thicker strokes than MNIST's: a 3×3 maximum at 280×280, then the
            // pen colour (black or white, alternately) with the ink as alpha.
            let big = ink(i, 10);
            let thick = GrayImage::from_fn(280, 280, |x, y| {
                let mut m = 0;
                for dy in -3i32..=3 {
                    for dx in -3i32..=3 {
                        let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                        if (0..280).contains(&nx) && (0..280).contains(&ny) {
                            m = m.max(big.get_pixel(nx as u32, ny as u32).0[0]);
                        }
                    }
                }
                Luma([m])
            });
            let pen = if i % 2 == 0 { 0 } else { 255 };
            let img = RgbaImage::from_fn(280, 280, |x, y| Rgba([pen, pen, pen, thick.get_pixel(x, y).0[0]]));
            encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png)
        }),
        ("large upscaled photo (700×700 JPEG, black on white)", |i, _| {
            let img = on_paper(&ink(i, 25), [240.0; 3], [20.0; 3]);
            encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
        }),
    ]
}

/// What a service without preprocessing does: grayscale, resize to 28×28, classify.
fn naive(bytes: &[u8]) -> Pixels {
    let img = image::load_from_memory(bytes).unwrap().to_luma8();
    let small = imageops::resize(&img, 28, 28, FilterType::Triangle);
    let mut out = [0.0; PIXELS];
    for (o, p) in out.iter_mut().zip(small.pixels()) {
        *o = f32::from(p.0[0]) / 255.0;
    }
    out
}

/// The default model, loaded to run in `precision`.
fn fixture(precision: Precision) -> Model {
    Model::load(trained_model(), ModelVersion::from("fixture"), None, precision).unwrap()
}

fn accuracy(model: &Model, inputs: &[Pixels], labels: &[u8]) -> f64 {
    let mut correct = 0;
    for (chunk, labels) in inputs.chunks(64).zip(labels.chunks(64)) {
        let flat: Vec<f32> = chunk.iter().flat_map(|p| p.iter().copied()).collect();
        let out = model.forward(&flat, chunk.len()).unwrap();
        for (row, &want) in out.chunks(10).zip(labels) {
            correct += usize::from(most_likely(row) == want);
        }
    }
    correct as f64 / labels.len() as f64
}

#[test]
fn preprocessing_keeps_every_upload_category_at_or_above_97_percent_in_f32_and_bf16() {
    let (f32_model, bf16_model) = (fixture(Precision::F32), fixture(Precision::Bf16));
    let limits = Limits::default();
    let indices: Vec<usize> = (0..PER_CATEGORY).map(|k| k * (10_000 / PER_CATEGORY)).collect();
    let labels: Vec<u8> = indices.iter().map(|&i| label(i)).collect();
    let mut report =
        String::from("| upload | naive resize | preprocessed, f32 | preprocessed, bf16 |\n|---|---|---|---|\n");
    let mut failures = Vec::new();
    for (name, make) in categories() {
        let started = std::time::Instant::now();
        let mut rng = StdRng::seed_from_u64(42);
        let uploads: Vec<Vec<u8>> = indices.iter().map(|&i| make(i, &mut rng)).collect();
        let prepared: Vec<Pixels> = uploads
            .iter()
            .map(|u| preprocess::prepare(u, &limits, false).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        let baseline: Vec<Pixels> = uploads.iter().map(|u| naive(u)).collect();
        let base = accuracy(&f32_model, &baseline, &labels);
        let ours = accuracy(&f32_model, &prepared, &labels);
        let ours_bf16 = accuracy(&bf16_model, &prepared, &labels);
        eprintln!(
            "{name}: preprocessed {:.1} % (bf16 {:.1} %), naive {:.1} % ({:.1?})",
            ours * 100.0,
            ours_bf16 * 100.0,
            base * 100.0,
            started.elapsed()
        );
        report.push_str(&format!(
            "| {name} | {:.1} % | {:.1} % | {:.1} % |\n",
            base * 100.0,
            ours * 100.0,
            ours_bf16 * 100.0
        ));
        for (precision, value) in [("f32", ours), ("bf16", ours_bf16)] {
            if value < FLOOR {
                failures.push(format!("{name} in {precision}: {:.1} %", value * 100.0));
            }
        }
    }
    eprintln!("\n{report}");
    assert!(failures.is_empty(), "below {:.0} %: {failures:?}", FLOOR * 100.0);
}

/// bf16 autocast (the default on CPUs with AMX or AVX-512 BF16) must not change
/// the answers: the same digit as float on all but a handful of the 10,000 MNIST
/// test digits, and probabilities within a few hundredths.
#[test]
fn bf16_answers_as_float_does_on_the_mnist_test_set() {
    let (f32_model, bf16_model) = (fixture(Precision::F32), fixture(Precision::Bf16));
    assert_eq!(bf16_model.precision(), Precision::Bf16);
    let (images, _) = common::mnist_test();
    let (mut differ, mut worst, mut n) = (0, 0f32, 0);
    for chunk in images.chunks(64 * PIXELS) {
        let batch = chunk.len() / PIXELS;
        let input: Vec<f32> = chunk.iter().map(|&v| f32::from(v) / 255.0).collect();
        let a = f32_model.forward(&input, batch).unwrap();
        let b = bf16_model.forward(&input, batch).unwrap();
        for (ra, rb) in a.chunks(10).zip(b.chunks(10)) {
            differ += usize::from(most_likely(ra) != most_likely(rb));
            for (x, y) in ra.iter().zip(rb) {
                worst = worst.max((x.exp() - y.exp()).abs());
            }
        }
        n += batch;
    }
    eprintln!("bf16 vs f32 on {n} digits: {differ} different answers, largest probability difference {worst:.4}");
    assert_eq!(n, 10_000);
    assert!(differ <= 10, "{differ} of {n} answers changed in bf16");
    assert!(worst < 0.1, "a probability moved by {worst} in bf16");
}
