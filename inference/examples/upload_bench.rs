//! Helper for `scripts/bench-uploads` (not a test): worst-case uploads of every
//! format the decoder accepts, at the default limits (40 M pixels, 10 MiB body,
//! 20000 a side), sent N at a time to a running `inference`, with the process's
//! peak resident memory (`VmHWM`, reset before each format through
//! `/proc/<pid>/clear_refs`) and a check that it still answers afterwards.
//!
//! ```text
//! upload_bench images <dir>                    # write the worst cases
//! upload_bench run <http-base> <pid> <dir> <n> # send each n at once; print a table
//! ```

use std::io::{Cursor, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use image::{DynamicImage, GrayImage, ImageFormat, Luma, RgbImage};

/// 6324 × 6324 = 39.99 M pixels: just under the default pixel limit.
const SIDE: u32 = 6324;

fn png16_rgba() -> anyhow::Result<Vec<u8>> {
    let out = Shared::default();
    let mut encoder = png::Encoder::new(out.clone(), SIDE, SIDE);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Sixteen);
    let mut writer = encoder.write_header()?.into_stream_writer()?;
    let row = vec![0xFFu8; SIDE as usize * 8];
    for _ in 0..SIDE {
        writer.write_all(&row)?;
    }
    writer.finish()?;
    Ok(std::mem::take(&mut *out.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?))
}

/// A `Write` that the `png` stream writer may own ('static) while the caller
/// keeps the bytes.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The same image Adam7-interlaced (the `png` crate writes no interlaced PNGs,
/// so the chunks are written here): an interlaced PNG is decoded whole.
fn png16_rgba_interlaced() -> anyhow::Result<Vec<u8>> {
    const PASSES: [(u32, u32, u32, u32); 7] =
        [(0, 8, 0, 8), (4, 8, 0, 8), (0, 4, 4, 8), (2, 4, 0, 4), (0, 2, 2, 4), (1, 2, 0, 2), (0, 1, 1, 2)];
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    for (x0, dx, y0, dy) in PASSES {
        let (cols, rows) = (SIDE.saturating_sub(x0).div_ceil(dx), SIDE.saturating_sub(y0).div_ceil(dy));
        let mut row = vec![0xFFu8; 1 + cols as usize * 8];
        row[0] = 0; // filter: none
        for _ in 0..rows {
            z.write_all(&row)?;
        }
    }
    let idat = z.finish()?;
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&SIDE.to_be_bytes());
    ihdr.extend_from_slice(&SIDE.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 1]); // 16-bit RGBA, deflate, adaptive, Adam7
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &idat[..]), (b"IEND", &[][..])] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    Ok(out)
}

fn jpeg_rgb() -> anyhow::Result<Vec<u8>> {
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(SIDE, SIDE, image::Rgb([200, 30, 30])));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)?;
    Ok(out)
}

fn gif_full_frame() -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let palette = [0u8, 0, 0, 255, 255, 255];
        let mut encoder = gif::Encoder::new(&mut out, SIDE as u16, SIDE as u16, &palette)?;
        let pixels = vec![1u8; SIDE as usize * SIDE as usize];
        let frame = gif::Frame::from_indexed_pixels(SIDE as u16, SIDE as u16, pixels, None);
        encoder.write_frame(&frame)?;
    }
    Ok(out)
}

fn tiff_rgba8_deflate() -> anyhow::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    let data = vec![0x80u8; SIDE as usize * SIDE as usize * 4];
    tiff::encoder::TiffEncoder::new(&mut out)?
        .with_compression(tiff::encoder::Compression::Deflate(tiff::encoder::DeflateLevel::Fast))
        .write_image::<tiff::encoder::colortype::RGBA8>(SIDE, SIDE, &data)?;
    Ok(out.into_inner())
}

fn webp_lossless() -> anyhow::Result<Vec<u8>> {
    let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(SIDE, SIDE, Luma([40])));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::WebP)?;
    Ok(out)
}

/// The largest uncompressed 24-bit BMP under the 10 MiB body limit.
fn bmp_rgb() -> anyhow::Result<Vec<u8>> {
    let side = 1860;
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(side, side, image::Rgb([10, 10, 10])));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Bmp)?;
    Ok(out)
}

/// Writes one worst case.
type Make = fn() -> anyhow::Result<Vec<u8>>;

/// The worst cases, by file name.
const IMAGES: [(&str, Make); 7] = [
    ("png16-rgba-6324.png", png16_rgba),
    ("png16-rgba-6324-interlaced.png", png16_rgba_interlaced),
    ("jpeg-rgb-6324.jpg", jpeg_rgb),
    ("gif-6324.gif", gif_full_frame),
    ("tiff-rgba8-deflate-6324.tif", tiff_rgba8_deflate),
    ("webp-lossless-6324.webp", webp_lossless),
    ("bmp-rgb-1860.bmp", bmp_rgb),
];

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("a value")?.parse()?)
}

fn vm_hwm_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:")
}

async fn run(base: &str, pid: u32, dir: &Path, n: usize) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let url = format!("{base}/v1/predict");
    let idle = vm_hwm_kib(pid)?;
    println!("| upload | bytes | sent at once | answers | peak RSS (VmHWM) | of the 1 GiB limit | RSS after | wall |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, _) in IMAGES {
        let body = std::fs::read(dir.join(name)).with_context(|| format!("reading {name}"))?;
        // Resets VmHWM to the current RSS (Linux 4.0+), so each row is its own peak.
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting VmHWM")?;
        let started = Instant::now();
        let sends = (0..n).map(|_| {
            let req = client.post(&url).header("Content-Type", "application/octet-stream").body(body.clone());
            async move { req.send().await.map(|r| r.status().as_u16()) }
        });
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for result in futures::future::join_all(sends).await {
            let key = result.map_or_else(|e| format!("error ({e})"), |s| s.to_string());
            *counts.entry(key).or_default() += 1;
        }
        let wall = started.elapsed();
        let peak = vm_hwm_kib(pid)?;
        let answers: Vec<String> = counts.iter().map(|(k, v)| format!("{v}× {k}")).collect();
        println!(
            "| {name} | {} | {n} | {} | {} MiB | {:.0} % | {} MiB | {:.1} s |",
            body.len(),
            answers.join(", "),
            peak / 1024,
            peak as f64 / (1024.0 * 1024.0) * 100.0,
            status_kib(pid, "VmRSS:")? / 1024,
            wall.as_secs_f64()
        );
        // Still answering: readiness and a small prediction.
        let ready = client.get(format!("{base}/readyz")).send().await?.status();
        if !ready.is_success() {
            bail!("after {name}: /readyz answered {ready}");
        }
        if counts.keys().any(|k| k.starts_with("error")) {
            bail!("after {name}: a request failed without an HTTP answer (the process died?)");
        }
    }
    println!("\nIdle before the first row: {} MiB resident (VmHWM).", idle / 1024);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("images") if args.len() == 3 => {
            let dir = Path::new(&args[2]);
            std::fs::create_dir_all(dir)?;
            for (name, make) in IMAGES {
                let bytes = make().with_context(|| format!("making {name}"))?;
                if bytes.len() > 10 << 20 {
                    bail!("{name} is {} bytes, over the 10 MiB body limit", bytes.len());
                }
                std::fs::write(dir.join(name), &bytes)?;
                eprintln!("{name}: {} bytes", bytes.len());
            }
            Ok(())
        }
        Some("run") if args.len() == 6 => run(&args[2], args[3].parse()?, Path::new(&args[4]), args[5].parse()?).await,
        _ => bail!("usage: upload_bench images <dir> | run <http-base> <pid> <dir> <n>"),
    }
}
