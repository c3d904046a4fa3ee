//! Hostile uploads over real HTTP and a real nats-server, at the default limits
//! unless a test says otherwise: decompression-bomb headers of every format the
//! decoder accepts, animated images (only the first frame is decoded), the decode
//! budget answering "busy" (HTTP 503 with `Retry-After`, NATS code 429 with
//! `retry_after_secs`), and worst-case images sent at once. After each, the instance
//! still answers.

mod common;

use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use common::{World, encode, http, small_png, tiny_model};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, DynamicImage, Frame, GrayImage, ImageFormat, Luma, RgbaImage};
use mnistflow_inference::service::BUSY_CODE;
use mnistflow_nats::{PredictError, PredictReply, Prediction, subjects};
use serde_json::Value;

struct Reply {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

async fn post(url: &str, body: Vec<u8>) -> Reply {
    let res = http().post(url).header("Content-Type", "application/octet-stream").body(body).send().await.unwrap();
    let status = res.status().as_u16();
    let retry_after = res.headers().get("Retry-After").map(|v| v.to_str().unwrap().to_owned());
    let json = res.json().await.unwrap_or(Value::Null);
    Reply { status, retry_after, json }
}

fn prediction(reply: &Reply, what: &str) -> Prediction {
    assert_eq!(reply.status, 200, "{what}: {}", reply.json);
    serde_json::from_value(reply.json.clone()).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn error(reply: &Reply, what: &str) -> PredictError {
    serde_json::from_value(reply.json.clone())
        .unwrap_or_else(|e| panic!("{what}: not a JSON error ({e}): {}", reply.json))
}

/// A 56×56 drawing: a thick stroke at column `x`, dark on light.
fn stroke(x: u32) -> GrayImage {
    let mut img = GrayImage::from_pixel(56, 56, Luma([240]));
    for y in 10..46 {
        for dx in 0..6 {
            img.put_pixel(x + dx, y, Luma([20]));
        }
    }
    img
}

/// A JPEG whose frame header (SOF0) claims `w`×`h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = encode(&DynamicImage::ImageLuma8(stroke(20)), ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).expect("a baseline JPEG has SOF0");
    // Marker (2), length (2), precision (1), then height and width, big-endian.
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

/// A GIF whose logical screen is `screen` and whose first frame claims `frame`.
fn gif_claiming(screen: (u16, u16), frame: (u16, u16)) -> Vec<u8> {
    let mut gif = encode(&DynamicImage::ImageLuma8(stroke(20)).into_rgba8().into(), ImageFormat::Gif);
    gif[6..8].copy_from_slice(&screen.0.to_le_bytes());
    gif[8..10].copy_from_slice(&screen.1.to_le_bytes());
    claim_frame(&mut gif, 0, frame);
    gif
}

/// Makes frame `index` of `gif` claim `w`×`h`.
fn claim_frame(gif: &mut [u8], index: usize, (w, h): (u16, u16)) {
    let at = image_descriptors(gif)[index];
    gif[at + 5..at + 7].copy_from_slice(&w.to_le_bytes());
    gif[at + 7..at + 9].copy_from_slice(&h.to_le_bytes());
}

/// The offsets of a GIF's image descriptors (0x2C), walking its blocks.
fn image_descriptors(gif: &[u8]) -> Vec<usize> {
    let skip_sub_blocks = |mut i: usize| {
        while gif[i] != 0 {
            i += gif[i] as usize + 1;
        }
        i + 1
    };
    let table = |flags: u8| if flags & 0x80 != 0 { 3usize << ((flags & 7) + 1) } else { 0 };
    let mut found = Vec::new();
    let mut i = 13 + table(gif[10]);
    loop {
        match gif[i] {
            0x2C => {
                found.push(i);
                // Descriptor (10 bytes), local colour table, LZW code size, data.
                i = skip_sub_blocks(i + 10 + table(gif[i + 9]) + 1);
            }
            0x21 => i = skip_sub_blocks(i + 2),
            0x3B => return found,
            other => panic!("unexpected GIF block 0x{other:02x} at {i}"),
        }
    }
}

/// A little-endian baseline TIFF claiming `w`×`h` 8-bit grayscale pixels in one
/// uncompressed strip of 16 bytes.
fn tiff_claiming(w: u32, h: u32) -> Vec<u8> {
    let entries: [(u16, u16, u32); 8] = [
        (256, 4, w),                  // ImageWidth, LONG
        (257, 4, h),                  // ImageLength
        (258, 3, 8),                  // BitsPerSample, SHORT
        (259, 3, 1),                  // Compression: none
        (262, 3, 1),                  // Photometric: black is zero
        (273, 4, 8 + 2 + 8 * 12 + 4), // StripOffsets: right after the IFD
        (278, 4, h),                  // RowsPerStrip
        (279, 4, 16),                 // StripByteCounts
    ];
    let mut t = b"II*\0".to_vec();
    t.extend_from_slice(&8u32.to_le_bytes());
    t.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        t.extend_from_slice(&tag.to_le_bytes());
        t.extend_from_slice(&kind.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        if kind == 3 {
            t.extend_from_slice(&(value as u16).to_le_bytes());
            t.extend_from_slice(&[0, 0]);
        } else {
            t.extend_from_slice(&value.to_le_bytes());
        }
    }
    t.extend_from_slice(&0u32.to_le_bytes());
    t.extend_from_slice(&[0u8; 16]);
    t
}

/// A lossless WebP (VP8L) whose header claims `w`×`h` (at most 16383 a side:
/// image-webp 0.2 reads 16384 as 0).
fn webp_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut webp = encode(&DynamicImage::ImageLuma8(stroke(20)).into_rgba8().into(), ImageFormat::WebP);
    assert_eq!(&webp[12..16], b"VP8L", "image writes lossless WebP");
    // After the chunk header and the signature byte 0x2F: 14 bits width − 1,
    // 14 bits height − 1, then alpha and version bits (kept).
    let bits = u32::from_le_bytes(webp[21..25].try_into().unwrap());
    let bits = (bits & 0xF000_0000) | (w - 1) | ((h - 1) << 14);
    webp[21..25].copy_from_slice(&bits.to_le_bytes());
    webp
}

/// A BMP whose header claims `w`×`h` 24-bit pixels.
fn bmp_claiming(w: i32, h: i32) -> Vec<u8> {
    let mut bmp = encode(&DynamicImage::ImageLuma8(stroke(20)).into_rgb8().into(), ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&w.to_le_bytes());
    bmp[22..26].copy_from_slice(&h.to_le_bytes());
    bmp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bomb_headers_of_every_format_are_refused_with_422_before_any_pixel_is_allocated() {
    let world = World::new().await;
    world.serve(&tiny_model(1), "tiny").await;
    let app = world.start(&[], true).await;
    let url = app.url("/v1/predict");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("JPEG claiming 65000×65000", jpeg_claiming(65_000, 65_000)),
        ("JPEG claiming 19000×19000 (sides allowed, 361 M pixels)", jpeg_claiming(19_000, 19_000)),
        ("GIF screen claiming 65535×65535", gif_claiming((65_535, 65_535), (65_535, 65_535))),
        ("GIF: 56×56 screen, first frame claiming 60000×60000", gif_claiming((56, 56), (60_000, 60_000))),
        ("GIF: 56×56 screen, first frame claiming 8000×8000", gif_claiming((56, 56), (8_000, 8_000))),
        ("TIFF claiming 100000×100000", tiff_claiming(100_000, 100_000)),
        ("TIFF claiming 19000×19000", tiff_claiming(19_000, 19_000)),
        ("WebP claiming 16383×16383", webp_claiming(16_383, 16_383)),
        ("BMP claiming 19000×19000", bmp_claiming(19_000, 19_000)),
    ];
    for (what, body) in cases {
        let reply = post(&url, body).await;
        assert_eq!(reply.status, 422, "{what}: {}", reply.json);
        let e = error(&reply, what);
        // Refused as too large (from the header), not decoded and found truncated.
        assert!(e.error.message.starts_with("image too large"), "{what}: {}", e.error.message);
    }
    let budget = &app.app().service().decode_budget;
    assert_eq!(budget.available(), budget.bytes(), "every reservation was released");
    prediction(&post(&url, small_png()).await, "a digit after the bombs");
    app.stop(Duration::from_secs(10)).await;
}

fn gif_frames(frames: Vec<RgbaImage>) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        encoder.set_repeat(Repeat::Infinite).unwrap();
        encoder
            .encode_frames(frames.into_iter().map(|f| Frame::from_parts(f, 0, 0, Delay::from_numer_denom_ms(100, 1))))
            .unwrap();
    }
    out
}

fn apng(frames: &[GrayImage]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let (w, h) = frames[0].dimensions();
        let mut encoder = png::Encoder::new(Cursor::new(&mut out), w, h);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_animated(frames.len() as u32, 0).unwrap();
        let mut writer = encoder.write_header().unwrap();
        for f in frames {
            writer.write_image_data(f.as_raw()).unwrap();
        }
        writer.finish().unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn animated_images_are_classified_by_their_first_frame_and_later_frames_are_never_decoded() {
    let world = World::new().await;
    world.serve(&tiny_model(1), "tiny").await;
    let app = world.start(&[], true).await;
    let url = app.url("/v1/predict");
    // Different shapes (preprocessing centres the ink, so positions would not do).
    let first = stroke(20);
    let mut second = GrayImage::from_pixel(56, 56, Luma([240]));
    for (i, y) in (10..46).enumerate() {
        for x in 0..36 {
            if x == i || x + i == 35 || y == 28 {
                second.put_pixel(10 + x as u32, y, Luma([20]));
            }
        }
    }
    let alone = prediction(&post(&url, encode(&DynamicImage::ImageLuma8(first.clone()), ImageFormat::Png)).await, "1");
    let other = prediction(&post(&url, encode(&DynamicImage::ImageLuma8(second.clone()), ImageFormat::Png)).await, "2");
    assert_ne!(alone.probabilities, other.probabilities, "the two frames must be told apart");

    let rgba = |g: &GrayImage| DynamicImage::ImageLuma8(g.clone()).into_rgba8();
    let gif = gif_frames(vec![rgba(&first), rgba(&second)]);
    let p = prediction(&post(&url, gif.clone()).await, "animated GIF");
    let single_gif = gif_frames(vec![rgba(&first)]);
    let q = prediction(&post(&url, single_gif).await, "one-frame GIF");
    assert_eq!(p.probabilities, q.probabilities, "an animated GIF is its first frame");

    let p = prediction(&post(&url, apng(&[first.clone(), second.clone()])).await, "APNG");
    assert_eq!(p.probabilities, alone.probabilities, "an APNG is its default image");

    // A second GIF frame that claims 60000×60000: never read, so never refused.
    let mut bomb_after = gif.clone();
    claim_frame(&mut bomb_after, 1, (60_000, 60_000));
    let p = prediction(&post(&url, bomb_after).await, "GIF whose second frame is a bomb");
    assert_eq!(p.probabilities, q.probabilities);
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_decode_budget_answers_503_with_retry_after_and_nats_429_and_both_answer_afterwards() {
    let world = World::new().await;
    world.serve(&tiny_model(1), "tiny").await;
    let app = world.start(&[], true).await;
    let url = app.url("/v1/predict");
    let budget = app.app().service().decode_budget.clone();
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    let subject = world.bus.subjects().full(subjects::PREDICT);
    let nats = |payload: Vec<u8>| {
        let (client, subject) = (client.clone(), subject.clone());
        async move {
            let reply = tokio::time::timeout(Duration::from_secs(20), client.request(subject, Bytes::from(payload)))
                .await
                .expect("a NATS reply within 20 s")
                .expect("a NATS reply");
            serde_json::from_slice::<PredictReply>(&reply.payload).unwrap()
        }
    };
    let large = encode(&DynamicImage::ImageLuma8(GrayImage::from_pixel(600, 600, Luma([200]))), ImageFormat::Png);

    // Everything held, as by decodes in flight.
    let held = budget.reserve(budget.bytes(), "the test").unwrap();
    for (what, body) in [("a large PNG", large.clone()), ("a 28×28 PNG", small_png())] {
        let reply = post(&url, body.clone()).await;
        assert_eq!(reply.status, 503, "{what}: {}", reply.json);
        assert_eq!(reply.retry_after.as_deref(), Some("1"), "{what}: Retry-After");
        assert_eq!(error(&reply, what).error.code, 503);
        match nats(body).await {
            PredictReply::Err(e) => {
                assert_eq!(e.error.code, BUSY_CODE, "{what} over NATS: {e:?}");
                assert_eq!(e.error.retry_after_secs, Some(1), "{what} over NATS: {e:?}");
            }
            PredictReply::Ok(p) => panic!("{what} over NATS answered {p:?} with the budget full"),
        }
    }
    drop(held);
    prediction(&post(&url, large.clone()).await, "a large PNG after the budget is free");
    assert!(matches!(nats(large).await, PredictReply::Ok(_)), "NATS after the budget is free");
    assert_eq!(budget.available(), budget.bytes());
    app.stop(Duration::from_secs(10)).await;
}

/// The case: a 6324×6324 16-bit RGBA PNG of one colour (40 M pixels, under
/// every default limit; 311 KB on the wire), written row by row.
fn big_png16() -> Vec<u8> {
    let side = 6324u32;
    let out = Shared::default();
    let mut encoder = png::Encoder::new(out.clone(), side, side);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Sixteen);
    let mut writer = encoder.write_header().unwrap().into_stream_writer().unwrap();
    let row = vec![0xFFu8; side as usize * 8];
    for _ in 0..side {
        std::io::Write::write_all(&mut writer, &row).unwrap();
    }
    writer.finish().unwrap();
    std::mem::take(&mut *out.0.lock().unwrap())
}

/// A `Write` that the `png` stream writer may own ('static) while the caller
/// keeps the bytes.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worst_case_uploads_at_the_default_limits_sent_at_once_are_answered_or_busy_and_the_instance_survives() {
    let world = World::new().await;
    world.serve(&tiny_model(1), "tiny").await;
    let app = world.start(&[], true).await;
    let url = app.url("/v1/predict");
    let png = tokio::task::spawn_blocking(big_png16).await.unwrap();
    assert!(png.len() < 1 << 20, "{} bytes: under the web tier's 1 MiB", png.len());
    // Interlaced PNGs need their whole (8-bit) frame; a 40 M pixel grayscale JPEG
    // is decoded to luma; a GIF whose small screen hides a large frame.
    let jpeg = tokio::task::spawn_blocking(|| {
        encode(&DynamicImage::ImageLuma8(GrayImage::from_pixel(6000, 6600, Luma([30]))), ImageFormat::Jpeg)
    })
    .await
    .unwrap();
    let mut bodies = vec![png; 8];
    bodies.extend(std::iter::repeat_n(jpeg, 4));
    let replies = futures::future::join_all(bodies.into_iter().map(|b| post(&url, b))).await;
    let (mut ok, mut busy) = (0, 0);
    for (i, reply) in replies.iter().enumerate() {
        match reply.status {
            200 => ok += 1,
            503 => {
                assert_eq!(reply.retry_after.as_deref(), Some("1"), "upload {i}");
                busy += 1;
            }
            other => panic!("upload {i}: {other} {}", reply.json),
        }
    }
    assert!(ok >= 1, "at least one worst-case upload is answered ({busy} busy)");
    let budget = &app.app().service().decode_budget;
    assert_eq!(budget.available(), budget.bytes(), "every reservation was released");
    prediction(&post(&url, small_png()).await, "a digit afterwards");
    app.stop(Duration::from_secs(10)).await;
}
