//! Tests of the parent module.

use super::*;
use crate::core::item::HostBatch;
use crate::data::batches::test_util::{assert_resumes_exactly, run_stage, run_stage_taking};
use image::{DynamicImage, GrayImage, ImageBuffer, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use image::imageops::FilterType;
use std::path::Path;

fn opts(size: u32, channels: Channels, fit: Fit) -> DecodeOptions {
    DecodeOptions { size, channels, fit, background: [255, 255, 255], max_pixels: 1 << 20 }
}

/// CHW bytes → the RGB triple of pixel (x, y).
fn px(chw: &[u8], size: u32, x: u32, y: u32) -> [u8; 3] {
    let plane = (size * size) as usize;
    let i = (y * size + x) as usize;
    [chw[i], chw[plane + i], chw[2 * plane + i]]
}

fn cfg(root: &Path, batch: usize) -> FolderLoaderConfig {
    FolderLoaderConfig { root: root.to_path_buf(), size: 8, batch, epochs: Some(1), workers: 2, ..Default::default() }
}

/// A solid RGB PNG of `w`×`h`.
fn solid_png(path: &Path, w: u32, h: u32, c: [u8; 3]) {
    RgbImage::from_pixel(w, h, Rgb(c)).save_with_format(path, ImageFormat::Png).unwrap();
}

#[test]
fn rgba_png_transparency_is_composited_onto_background() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.png");
    let img = RgbaImage::from_raw(2, 2, vec![255, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255, 128, 0, 255, 0, 255]).unwrap();
    img.save(&p).unwrap();
    let out = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(px(&out, 2, 0, 0), [255, 0, 0]);
    assert_eq!(px(&out, 2, 1, 0), [255, 255, 255]);
    // 0·128/255 + 255·127/255 = 127.0 (rounded); blue 255 either way.
    assert_eq!(px(&out, 2, 0, 1), [127, 127, 255]);
    assert_eq!(px(&out, 2, 1, 1), [0, 255, 0]);
    // Another background.
    let o = DecodeOptions { background: [10, 20, 30], ..opts(2, Channels::Rgb, Fit::Pad) };
    assert_eq!(px(&decode(&p, &o).unwrap(), 2, 1, 0), [10, 20, 30]);
}

#[test]
fn palette_png_with_transparent_entry() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pal.png");
    {
        let f = std::fs::File::create(&p).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 2, 2);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![10, 20, 30, 0, 0, 0, 200, 100, 0]);
        enc.set_trns(vec![255, 0, 255]);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 1, 2, 1]).unwrap();
    }
    let out = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
    assert_eq!(px(&out, 2, 0, 0), [10, 20, 30]);
    assert_eq!(px(&out, 2, 1, 0), [255, 255, 255]);
    assert_eq!(px(&out, 2, 0, 1), [200, 100, 0]);
    assert_eq!(px(&out, 2, 1, 1), [255, 255, 255]);
}

#[test]
fn grey_png_as_rgb_and_grey() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.png");
    GrayImage::from_raw(2, 2, vec![0, 50, 100, 255]).unwrap().save(&p).unwrap();
    let rgb = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
    assert_eq!(rgb, [0, 50, 100, 255].repeat(3));
    let grey = decode(&p, &opts(2, Channels::Grey, Fit::Pad)).unwrap();
    assert_eq!(grey, vec![0, 50, 100, 255]);
    // Colour → grey uses image's luma.
    let q = dir.path().join("c.png");
    solid_png(&q, 2, 2, [255, 0, 0]);
    let expected = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]))).to_luma8().get_pixel(0, 0)[0];
    assert_eq!(decode(&q, &opts(2, Channels::Grey, Fit::Pad)).unwrap(), vec![expected; 4]);
}

#[test]
fn sixteen_bit_png_is_rounded_to_eight_bits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("16.png");
    let img: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_raw(2, 1, vec![65535, 0, 100 * 257, 128 * 257, 257, 0]).unwrap();
    img.save(&p).unwrap();
    let out = decode(&p, &opts(2, Channels::Rgb, Fit::Pad)).unwrap();
    // 2×1 padded into 2×2: the image is row 0 (offset (2 − 1) / 2 = 0), row 1 background.
    assert_eq!(px(&out, 2, 0, 0), [255, 0, 100]);
    assert_eq!(px(&out, 2, 1, 0), [128, 1, 0]);
    assert_eq!(px(&out, 2, 0, 1), [255, 255, 255]);
    // Grey 16-bit with alpha.
    let q = dir.path().join("la16.png");
    let la: ImageBuffer<image::LumaA<u16>, Vec<u16>> = ImageBuffer::from_raw(1, 1, vec![60 * 257, 65535]).unwrap();
    la.save(&q).unwrap();
    assert_eq!(decode(&q, &opts(1, Channels::Grey, Fit::Pad)).unwrap(), vec![60]);
}

#[test]
fn jpeg_gif_webp_bmp_decode() {
    let dir = tempfile::tempdir().unwrap();
    let c = [200u8, 100, 50];
    let img = RgbImage::from_pixel(8, 8, Rgb(c));
    let near = |out: &[u8]| {
        for (k, chunk) in out.chunks(64).enumerate() {
            for &v in chunk {
                assert!((v as i32 - c[k] as i32).abs() <= 4, "channel {k}: {v} vs {}", c[k]);
            }
        }
    };
    let jpg = dir.path().join("a.jpg");
    img.save(&jpg).unwrap();
    near(&decode(&jpg, &opts(8, Channels::Rgb, Fit::Pad)).unwrap());
    let bmp = dir.path().join("a.bmp");
    img.save(&bmp).unwrap();
    assert_eq!(decode(&bmp, &opts(8, Channels::Rgb, Fit::Pad)).unwrap()[0], 200);
    let webp = dir.path().join("a.webp");
    DynamicImage::ImageRgb8(img.clone()).to_rgba8().save(&webp).unwrap();
    assert_eq!(decode(&webp, &opts(8, Channels::Rgb, Fit::Pad)).unwrap()[0], 200);
    // A PNG named .jpg: the format comes from the content.
    let lying = dir.path().join("really-png.jpg");
    img.save_with_format(&lying, ImageFormat::Png).unwrap();
    assert_eq!(decode(&lying, &opts(8, Channels::Rgb, Fit::Pad)).unwrap()[0], 200);
    // GIF: the first of two frames.
    let gif = dir.path().join("anim.gif");
    {
        let f = std::fs::File::create(&gif).unwrap();
        let mut enc = image::codecs::gif::GifEncoder::new(f);
        let f1 = RgbaImage::from_pixel(4, 4, Rgba([255, 0, 0, 255]));
        let f2 = RgbaImage::from_pixel(4, 4, Rgba([0, 0, 255, 255]));
        enc.encode_frames(vec![image::Frame::new(f1), image::Frame::new(f2)]).unwrap();
    }
    let out = decode(&gif, &opts(4, Channels::Rgb, Fit::Pad)).unwrap();
    assert_eq!(px(&out, 4, 1, 1), [255, 0, 0]);
}

#[test]
fn non_square_pad_and_crop() {
    let dir = tempfile::tempdir().unwrap();
    // 4×2 red: padded into 4×4, rows 0 and 3 background, rows 1–2 red (no resampling).
    let p = dir.path().join("wide.png");
    solid_png(&p, 4, 2, [255, 0, 0]);
    let o = DecodeOptions { background: [0, 0, 255], ..opts(4, Channels::Rgb, Fit::Pad) };
    let out = decode(&p, &o).unwrap();
    for x in 0..4 {
        assert_eq!(px(&out, 4, x, 0), [0, 0, 255]);
        assert_eq!(px(&out, 4, x, 1), [255, 0, 0]);
        assert_eq!(px(&out, 4, x, 2), [255, 0, 0]);
        assert_eq!(px(&out, 4, x, 3), [0, 0, 255]);
    }
    // 2×16 tall, downscaled to 1×8 inside 8×8: columns 0..3 and 4..7 — centred at x = 3.
    let t = dir.path().join("tall.png");
    solid_png(&t, 2, 16, [0, 255, 0]);
    let out = decode(&t, &opts(8, Channels::Rgb, Fit::Pad)).unwrap();
    for y in 0..8 {
        assert_eq!(px(&out, 8, 0, y), [255, 255, 255]);
        assert_eq!(px(&out, 8, 7, y), [255, 255, 255]);
        let c = px(&out, 8, 3, y);
        assert!(c[0] <= 1 && c[1] >= 254 && c[2] <= 1, "{c:?}");
    }
    // Crop: 6×2 blue | red | green → the centre 2×2 is red.
    let s = dir.path().join("stripes.png");
    let mut img = RgbImage::new(6, 2);
    for (x, _, p) in img.enumerate_pixels_mut() {
        *p = match x / 2 {
            0 => Rgb([0, 0, 255]),
            1 => Rgb([255, 0, 0]),
            _ => Rgb([0, 255, 0]),
        };
    }
    img.save(&s).unwrap();
    let out = decode(&s, &opts(2, Channels::Rgb, Fit::Crop)).unwrap();
    assert_eq!(out, [255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Crop with resampling: 12×4 → centre 4×4 (red) → 2×2.
    let big = image::imageops::resize(&img, 12, 4, FilterType::Nearest);
    let b = dir.path().join("stripes-big.png");
    big.save(&b).unwrap();
    let out = decode(&b, &opts(2, Channels::Rgb, Fit::Crop)).unwrap();
    assert!(out[..4].iter().all(|&v| v >= 250), "{out:?}");
    assert!(out[4..].iter().all(|&v| v <= 5), "{out:?}");
}

#[test]
fn bad_files_and_limits_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4, Channels::Rgb, Fit::Pad);
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert!(decode(&empty, &o).unwrap_err().to_string().contains("empty"));
    let text = dir.path().join("text.png");
    std::fs::write(&text, b"hello, this is not an image at all").unwrap();
    assert!(!decode(&text, &o).unwrap_err().to_string().is_empty());
    let good = dir.path().join("good.png");
    solid_png(&good, 64, 64, [1, 2, 3]);
    let bytes = std::fs::read(&good).unwrap();
    let trunc = dir.path().join("trunc.png");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    assert!(decode(&trunc, &o).is_err());
    let big = DecodeOptions { max_pixels: 1000, ..o };
    let e = decode(&good, &big).unwrap_err().to_string();
    assert!(e.contains("64×64 = 4096 pixels") && e.contains("max_pixels"), "{e}");
}

/// A folder of `n` distinct images of assorted sizes (some need resampling).
fn varied_folder(dir: &Path, n: u32) {
    for i in 0..n {
        let (w, h) = (5 + i % 7, 3 + (i * 3) % 11);
        let img =
            RgbaImage::from_fn(w, h, |x, y| Rgba([(x * 40 + i * 7) as u8, (y * 30 + i) as u8, (i * 13) as u8, 128 + (i % 128) as u8]));
        let sub = dir.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        img.save(sub.join(format!("img{i:03}.png"))).unwrap();
    }
}

#[test]
fn decoded_images_are_kept_when_the_set_fits() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4u8 {
        solid_png(&dir.path().join(format!("c{i}.png")), 8, 8, [i, 2 * i, 3 * i]);
    }
    // 4 files of 3·8·8 bytes fit in 1 MiB; in 0 they don't.
    let on = build(&FolderLoaderConfig { cache_mib: 1, ..cfg(dir.path(), 2) }, 0, None, DataPosition::default()).unwrap();
    let off = build(&FolderLoaderConfig { cache_mib: 0, ..cfg(dir.path(), 2) }, 0, None, DataPosition::default()).unwrap();
    assert!(on.caches() && !off.caches());
    let fetch = |pool: &Pool, seq: u64| {
        pool.submit(seq, 0);
        pool.results.recv().unwrap()
    };
    let cached = Pool::start(1, on.files.clone(), on.opts, on.cache.clone()).unwrap();
    let plain = Pool::start(1, off.files.clone(), off.opts, None).unwrap();
    let first = fetch(&cached, 0).1.unwrap();
    assert!(fetch(&plain, 0).1.is_ok());
    // The file goes away: the cache still serves it (decoded once), the plain pool can't.
    std::fs::remove_file(&on.files[0]).unwrap();
    assert_eq!(fetch(&cached, 1).1.unwrap(), first);
    assert!(fetch(&plain, 1).1.is_err());
    // A whole run from the cache gives the same batches as one without.
    let c = FolderLoaderConfig { epochs: Some(3), ..cfg(dir.path(), 1) };
    for i in 0..4u8 {
        solid_png(&dir.path().join(format!("c{i}.png")), 8, 8, [i, 2 * i, 3 * i]);
    }
    let a = run_stage(Box::new(build(&FolderLoaderConfig { cache_mib: 1, ..c.clone() }, 7, None, DataPosition::default()).unwrap()));
    let b = run_stage(Box::new(build(&FolderLoaderConfig { cache_mib: 0, ..c }, 7, None, DataPosition::default()).unwrap()));
    assert_eq!(a.batches.len(), 12);
    assert_eq!(a.batches, b.batches);
}

#[test]
fn loader_skips_bad_files_with_warnings() {
    let dir = tempfile::tempdir().unwrap();
    for (i, c) in [[255u8, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]].iter().enumerate() {
        solid_png(&dir.path().join(format!("ok{i}.png")), 8, 8, *c);
    }
    std::fs::write(dir.path().join("zero.png"), b"").unwrap();
    std::fs::write(dir.path().join("junk.JPG"), b"not a jpeg").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let c = FolderLoaderConfig { epochs: Some(2), ..cfg(dir.path(), 2) };
    let loader = build(&c, 5, None, DataPosition::default()).unwrap();
    assert_eq!(loader.len(), 6);
    assert_eq!(loader.image_shape(), [3, 8, 8]);
    let out = run_stage(Box::new(loader));
    out.result.unwrap();
    assert_eq!(out.batches.len(), 4, "4 good files, batch 2, 2 epochs");
    let epochs: Vec<u32> = out.batches.iter().map(|b| b.epoch).collect();
    assert_eq!(epochs, vec![0, 0, 1, 1]);
    let idx: Vec<u64> = out.batches.iter().map(|b| b.index).collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert!(out.batches.iter().all(|b| b.shape == [2, 3, 8, 8] && b.x.len() == 2 * 192));
    // One warning per bad file (not repeated in epoch 2), then the summary.
    assert_eq!(out.warnings.len(), 3, "{:?}", out.warnings);
    assert!(out.warnings.iter().any(|w| w.contains("zero.png") && w.contains("empty")));
    assert!(out.warnings.iter().any(|w| w.contains("junk.JPG")));
    let last = out.warnings.last().unwrap();
    assert!(last.starts_with("skipped 2 unreadable files (first: "), "{last}");

    // Fail: the run stops with an error naming the bad file.
    let c = FolderLoaderConfig { on_bad_file: OnBadFile::Fail, shuffle: false, ..c };
    let out = run_stage(Box::new(build(&c, 5, None, DataPosition::default()).unwrap()));
    let e = out.result.unwrap_err().to_string();
    assert!(e.contains("junk.JPG"), "{e}");
}

#[test]
fn all_bad_or_too_few_good_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.png"), b"x").unwrap();
    std::fs::write(dir.path().join("b.png"), b"y").unwrap();
    let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 1) };
    let out = run_stage(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()));
    let e = out.result.unwrap_err().to_string();
    assert!(e.contains("none of the 2 image files could be decoded"), "{e}");
    // One good file, batch 2 with drop_last: no batch can ever be made.
    solid_png(&dir.path().join("c.png"), 8, 8, [0, 0, 0]);
    let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 2) };
    let out = run_stage(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()));
    let e = out.result.unwrap_err().to_string();
    assert!(e.contains("only 1 of 3"), "{e}");
}

#[test]
fn no_images_and_missing_root_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
    let e = build(&cfg(dir.path(), 1), 0, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.starts_with("no images (png, jpg, jpeg, gif, webp, bmp) found under"), "{e}");
    let e = build(&cfg(&dir.path().join("nope"), 1), 0, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.contains("no such folder"), "{e}");
}

#[cfg(unix)]
#[test]
fn symlink_loop_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    solid_png(&sub.join("a.png"), 8, 8, [1, 1, 1]);
    std::os::unix::fs::symlink(dir.path(), sub.join("loop")).unwrap();
    let loader = build(&cfg(dir.path(), 1), 0, None, DataPosition::default()).unwrap();
    assert_eq!(loader.len(), 1);
    let out = run_stage(Box::new(loader));
    out.result.unwrap();
    assert_eq!(out.batches.len(), 1);
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    assert!(out.warnings[0].contains("loop"), "{:?}", out.warnings);
}

#[test]
fn grey_batches_and_partial_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    varied_folder(dir.path(), 5);
    let c = FolderLoaderConfig { channels: Channels::Grey, size: 6, drop_last: false, ..cfg(dir.path(), 2) };
    let loader = build(&c, 1, None, DataPosition::default()).unwrap();
    assert_eq!(loader.image_shape(), [1, 6, 6]);
    let out = run_stage(Box::new(loader));
    out.result.unwrap();
    let shapes: Vec<[usize; 4]> = out.batches.iter().map(|b| b.shape).collect();
    assert_eq!(shapes, vec![[2, 1, 6, 6], [2, 1, 6, 6], [1, 1, 6, 6]]);
    assert!(out.batches.iter().flat_map(|b| &b.x).all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn decoding_order_is_deterministic_with_many_workers() {
    let dir = tempfile::tempdir().unwrap();
    varied_folder(dir.path(), 40);
    std::fs::write(dir.path().join("d1").join("broken.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let c = FolderLoaderConfig { workers: 4, batch: 6, epochs: Some(3), ..cfg(dir.path(), 6) };
    let a = run_stage(Box::new(build(&c, 99, None, DataPosition::default()).unwrap()));
    let b = run_stage(Box::new(build(&c, 99, None, DataPosition::default()).unwrap()));
    a.result.unwrap();
    assert_eq!(a.batches.len(), 3 * (40 / 6));
    assert_eq!(a.batches, b.batches);
    // Same bytes with a single worker.
    let one = FolderLoaderConfig { workers: 1, ..c.clone() };
    let s = run_stage(Box::new(build(&one, 99, None, DataPosition::default()).unwrap()));
    assert_eq!(a.batches, s.batches);
    // Epochs differ in order; another seed differs.
    assert_ne!(a.batches[0].x, a.batches[6].x);
    let other = run_stage(Box::new(build(&c, 100, None, DataPosition::default()).unwrap()));
    assert_ne!(a.batches[0].x, other.batches[0].x);
}

#[test]
fn stops_at_max_batches_and_when_outputs_close() {
    let dir = tempfile::tempdir().unwrap();
    varied_folder(dir.path(), 7);
    let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 3) };
    let out = run_stage(Box::new(build(&c, 0, Some(5), DataPosition::default()).unwrap()));
    out.result.unwrap();
    let ep: Vec<u32> = out.batches.iter().map(|b| b.epoch).collect();
    assert_eq!(ep, vec![0, 0, 1, 1, 2]);
    let out = run_stage_taking(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()), 2);
    out.result.unwrap();
    assert_eq!(out.batches.len(), 2);
}

#[test]
fn resuming_after_any_batch_gives_the_rest_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // 11 good files and 2 bad ones: 13 files, batch 3 never divides the good count evenly.
    varied_folder(dir.path(), 11);
    std::fs::write(dir.path().join("d0").join("bad-a.png"), b"not a png").unwrap();
    std::fs::write(dir.path().join("d2").join("bad-b.png"), b"").unwrap();
    let seed = 3;
    for drop_last in [true, false] {
        let c = FolderLoaderConfig { epochs: Some(3), shuffle: true, drop_last, ..cfg(dir.path(), 3) };
        let run_from = |start| run_stage(Box::new(build(&c, seed, None, start).unwrap()));
        let full = run_from(DataPosition::default());
        full.result.unwrap();
        assert_eq!(full.batches.len(), if drop_last { 3 * 3 } else { 3 * 4 });
        assert_eq!(full.warnings.len(), 3, "{:?}", full.warnings);
        let files = build(&c, seed, None, DataPosition::default()).unwrap().files().to_vec();
        let n = files.len();
        assert_eq!(n, 13);
        // Bad files lie both before and after some of the resume positions (in the epoch).
        let bad: Vec<usize> = files.iter().enumerate().filter(|(_, f)| f.to_string_lossy().contains("bad-")).map(|(i, _)| i).collect();
        let around = |b: &HostBatch| {
            let order = epoch_order(n, seed, b.epoch, true);
            let at: Vec<u64> = bad.iter().map(|&i| order.iter().position(|&o| o == i).unwrap() as u64).collect();
            (at.iter().any(|&p| p < b.next_pos), at.iter().any(|&p| p >= b.next_pos))
        };
        assert!(full.batches.iter().any(|b| around(b) == (true, true)), "no resume point between the bad files");
        assert!(full.batches.iter().any(|b| around(b) == (false, true)), "no resume point before both bad files");
        let ends = assert_resumes_exactly(&full.batches, n as u64, run_from);
        assert_eq!(ends > 0, !drop_last, "{ends} resume points at an epoch's end");
        // A position at the very end of an epoch (with drop_last, no batch ends there).
        let first_of_1 = full.batches.iter().position(|b| b.epoch == 1).unwrap();
        let start = DataPosition { next_index: first_of_1 as u64, epoch: 0, pos: n as u64 };
        let out = run_from(start);
        out.result.unwrap();
        assert!(out.batches == full.batches[first_of_1..], "resumed at the end of epoch 0");
    }
}

#[test]
fn resuming_does_not_read_the_files_before_the_position() {
    let dir = tempfile::tempdir().unwrap();
    varied_folder(dir.path(), 9);
    let c = FolderLoaderConfig { epochs: Some(2), shuffle: false, on_bad_file: OnBadFile::Fail, ..cfg(dir.path(), 2) };
    let full = run_stage(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()));
    full.result.unwrap();
    // Spoil the files before position 6 of epoch 1 (file order, no shuffle): with `Fail`,
    // reading any of them would stop the run.
    let start = full.batches[6].position_after();
    assert_eq!(start, DataPosition { next_index: 7, epoch: 1, pos: 6 });
    let files = build(&c, 0, None, DataPosition::default()).unwrap().files().to_vec();
    for f in &files[..6] {
        std::fs::write(f, b"spoilt").unwrap();
    }
    let out = run_stage(Box::new(build(&c, 0, None, start).unwrap()));
    out.result.unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert!(out.batches == full.batches[7..]);
}

#[test]
fn resuming_near_an_epoch_end_with_drop_last_is_no_error() {
    let dir = tempfile::tempdir().unwrap();
    varied_folder(dir.path(), 7);
    // 8 files in path order, the last one bad. Batch 3, drop_last: from positions 5 to 8,
    // at most 2 good files are left in the epoch.
    std::fs::create_dir(dir.path().join("e")).unwrap();
    std::fs::write(dir.path().join("e").join("bad.png"), b"junk").unwrap();
    let c = FolderLoaderConfig { epochs: Some(1), shuffle: false, ..cfg(dir.path(), 3) };
    for pos in [5, 6, 7, 8] {
        let out = run_stage(Box::new(build(&c, 0, None, DataPosition { next_index: 2, epoch: 0, pos }).unwrap()));
        out.result.unwrap_or_else(|e| panic!("pos {pos}: {e}"));
        assert!(out.batches.is_empty());
    }
    // With a second epoch, the whole of it follows.
    let c2 = FolderLoaderConfig { epochs: Some(2), ..c.clone() };
    let full = run_stage(Box::new(build(&c2, 0, None, DataPosition::default()).unwrap())).batches;
    assert_eq!(full.len(), 4);
    let out = run_stage(Box::new(build(&c2, 0, None, DataPosition { next_index: 2, epoch: 0, pos: 7 }).unwrap()));
    out.result.unwrap();
    assert!(out.batches == full[2..]);
    // A whole epoch that cannot make a batch still is an error.
    let c3 = FolderLoaderConfig { batch: 8, epochs: Some(2), ..c.clone() };
    let out = run_stage(Box::new(build(&c3, 0, None, DataPosition { next_index: 0, epoch: 0, pos: 7 }).unwrap()));
    let e = out.result.unwrap_err().to_string();
    assert!(e.contains("only 7 of 8"), "{e}");
}

#[test]
fn resuming_keeps_max_batches_absolute_and_checks_the_position() {
    let dir = tempfile::tempdir().unwrap();
    varied_folder(dir.path(), 7);
    let c = FolderLoaderConfig { epochs: None, ..cfg(dir.path(), 3) };
    let full = run_stage(Box::new(build(&c, 0, Some(8), DataPosition::default()).unwrap())).batches;
    assert_eq!(full.len(), 8);
    let start = full[4].position_after();
    assert_eq!(start.next_index, 5);
    let out = run_stage(Box::new(build(&c, 0, Some(8), start).unwrap()));
    out.result.unwrap();
    assert_eq!(out.batches.iter().map(|b| b.index).collect::<Vec<_>>(), vec![5, 6, 7]);
    assert!(out.batches == full[5..]);
    // At or past a limit: nothing, no error.
    let out = run_stage(Box::new(build(&c, 0, Some(8), DataPosition { next_index: 9, ..start }).unwrap()));
    assert!(out.result.is_ok() && out.batches.is_empty());
    let c1 = FolderLoaderConfig { epochs: Some(2), ..c.clone() };
    let out = run_stage(Box::new(build(&c1, 0, None, DataPosition { next_index: 4, epoch: 2, pos: 0 }).unwrap()));
    assert!(out.result.is_ok() && out.batches.is_empty());
    // Past the end of an epoch: the data changed.
    let e = build(&c, 0, None, DataPosition { next_index: 3, epoch: 1, pos: 8 }).unwrap_err().to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
    assert!(
        e.contains("cannot resume at image 8 of epoch 1: the data has only 7 images (was it changed since the checkpoint?)"),
        "{e}"
    );
}

#[test]
fn config_defaults_and_unknown_fields() {
    let c: FolderLoaderConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, FolderLoaderConfig::default());
    assert_eq!((c.size, c.channels, c.fit, c.background), (64, Channels::Rgb, Fit::Pad, [255; 3]));
    assert_eq!((c.workers, c.on_bad_file, c.batch), (0, OnBadFile::Skip, 64));
    assert!(serde_json::from_str::<FolderLoaderConfig>(r#"{"colour": 1}"#).is_err());
    let c: FolderLoaderConfig = serde_json::from_str(r#"{"channels": "Grey", "fit": "Crop", "on_bad_file": "Fail"}"#).unwrap();
    assert_eq!((c.channels, c.fit, c.on_bad_file), (Channels::Grey, Fit::Crop, OnBadFile::Fail));
}

/// Manual timing on the real illustrations (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn real_illustrations_epoch_time() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/illustrations");
    for (workers, size) in [(1, 64), (2, 64), (2, 48)] {
        let c = FolderLoaderConfig { root: root.clone(), workers, size, epochs: Some(1), ..Default::default() };
        let loader = build(&c, 0, None, DataPosition::default()).unwrap();
        let n = loader.len();
        let t = std::time::Instant::now();
        let out = run_stage(Box::new(loader));
        let dt = t.elapsed();
        out.result.unwrap();
        eprintln!(
            "workers={workers}, size={size}: {n} files, {} batches of {:?} in {dt:?} ({:.0} images/s), \
             warnings {:?}",
            out.batches.len(),
            out.batches[0].shape,
            (out.batches.len() * 64) as f64 / dt.as_secs_f64(),
            out.warnings
        );
    }
}
