//! Hostile inputs and faults: every case gives one clear message naming the file, stage or
//! field, no panic and no backtrace, the documented exit code, and nothing written so far is
//! lost. The fixtures are made here. (SIGKILL followed by `--resume` is in tests/it/checkpoint.rs.)

use pipe_stages::kinds::folder_loader::{decode, Channels, DecodeOptions, Fit};
use std::io::Write;
use std::path::Path;
use std::process::Output;

use crate::common;
use crate::common::{mnist_root, pipe, run, stderr};

/// Tiny MNIST MLP run settings.
/// The tiny-model preset, logging every 5 steps.
const TINY: [&str; 8] =
    [common::TINY[0], common::TINY[1], common::TINY[2], common::TINY[3], common::TINY[4], common::TINY[5], "--set", "log_every=5"];
fn mnist_run(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.extend(extra);
    run(&args)
}

/// No panic, no Rust or C++ backtrace in what the user sees.
fn assert_clean(o: &Output) {
    let e = stderr(o);
    for bad in ["panicked", "RUST_BACKTRACE=1 for details", "frame #", "stack backtrace", "Exception raised from"] {
        assert!(!e.contains(bad), "`{bad}` in: {e}");
    }
}

fn expect(o: &Output, code: i32, parts: &[&str]) {
    assert_eq!(o.status.code(), Some(code), "{}", stderr(o));
    for p in parts {
        assert!(stderr(o).contains(p), "`{p}` not in: {}", stderr(o));
    }
    assert_clean(o);
}

fn opts(size: u32) -> DecodeOptions {
    DecodeOptions { size, channels: Channels::Rgb, fit: Fit::Pad, background: [255, 255, 255], max_pixels: 1 << 24 }
}

/// Pixel (x, y) of a CHW RGB square of side `size`.
fn px(chw: &[u8], size: u32, x: u32, y: u32) -> [u8; 3] {
    let plane = (size * size) as usize;
    let i = (y * size + x) as usize;
    [chw[i], chw[plane + i], chw[2 * plane + i]]
}

fn near(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter().zip(b).all(|(x, y)| (*x as i32 - y as i32).abs() <= tol)
}

fn solid_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
}

/// A PNG whose header declares `w`×`h` RGBA pixels, followed by a few bytes of data: a
/// decompression bomb as far as the header goes.
fn bomb_png(path: &Path, w: u32, h: u32) {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        c.extend_from_slice(&crc.finalize().to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    let mut z = flate2::write::ZlibEncoder::new(vec![], flate2::Compression::default());
    z.write_all(&[0u8; 64]).unwrap();
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(chunk(b"IHDR", &ihdr));
    bytes.extend(chunk(b"IDAT", &z.finish().unwrap()));
    bytes.extend(chunk(b"IEND", &[]));
    std::fs::write(path, bytes).unwrap();
}

/// A JPEG (RGB, `w`×`h`, left half `left`, right half `right`) with an EXIF orientation tag.
fn exif_jpeg(path: &Path, w: u32, h: u32, left: [u8; 3], right: [u8; 3], orientation: u16) {
    let img = image::RgbImage::from_fn(w, h, |x, _| image::Rgb(if x < w / 2 { left } else { right }));
    // EXIF: a big-endian TIFF header and one IFD entry, Orientation (0x0112), SHORT.
    let mut exif = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01".to_vec();
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(std::fs::File::create(path).unwrap(), 95);
    use image::ImageEncoder;
    enc.set_exif_metadata(exif).unwrap();
    enc.write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8).unwrap();
}

#[test]
fn odd_images_decode_as_expected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = opts(8);

    // Broken files: each a clear reason (the loader adds the file name).
    std::fs::write(d.join("zero.png"), b"").unwrap();
    assert_eq!(decode(&d.join("zero.png"), &o).unwrap_err().to_string(), "empty file (0 bytes)");
    std::fs::write(d.join("text.png"), b"hello, I am not a picture\n").unwrap();
    assert_eq!(
        decode(&d.join("text.png"), &o).unwrap_err().to_string(),
        "cannot decode: Format error decoding Png: Invalid PNG signature."
    );
    std::fs::write(d.join("text.webp.bmp.jpeg"), b"hello").unwrap();
    assert!(decode(&d.join("text.webp.bmp.jpeg"), &o).unwrap_err().to_string().starts_with("cannot decode"));
    solid_png(&d.join("whole.png"), 32, 32, [10, 20, 30]);
    let png = std::fs::read(d.join("whole.png")).unwrap();
    std::fs::write(d.join("cut.png"), &png[..png.len() / 2]).unwrap();
    assert!(decode(&d.join("cut.png"), &o).unwrap_err().to_string().starts_with("cannot decode"));
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10])).save(d.join("whole.jpg")).unwrap();
    let jpg = std::fs::read(d.join("whole.jpg")).unwrap();
    std::fs::write(d.join("cut.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    assert!(decode(&d.join("cut.jpg"), &o).is_err());

    // A decompression bomb: refused from its header, at once and without allocating 40 GB.
    bomb_png(&d.join("bomb.png"), 100_000, 100_000);
    let t = std::time::Instant::now();
    let e = decode(&d.join("bomb.png"), &o).unwrap_err().to_string();
    assert!(e.contains("100000×100000 = 10000000000 pixels, more than max_pixels = 16777216"), "{e}");
    assert!(t.elapsed().as_millis() < 500);

    // 16-bit PNG: rounded to 8 bits.
    let img16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(8, 8, image::Rgb([65535u16, 32896, 0]));
    image::DynamicImage::ImageRgb16(img16).save(d.join("deep.png")).unwrap();
    assert_eq!(px(&decode(&d.join("deep.png"), &o).unwrap(), 8, 3, 3), [255, 128, 0]);

    // Palette PNG with a transparent entry: composited onto the white background.
    {
        let f = std::fs::File::create(d.join("palette.png")).unwrap();
        let mut e = png::Encoder::new(std::io::BufWriter::new(f), 8, 8);
        e.set_color(png::ColorType::Indexed);
        e.set_depth(png::BitDepth::Eight);
        e.set_palette(vec![0, 0, 255, 255, 0, 0]); // 0: blue, 1: red
        e.set_trns(vec![255, 0]); // red is fully transparent
        let mut w = e.write_header().unwrap();
        let idx: Vec<u8> = (0..64).map(|i| if i < 32 { 0 } else { 1 }).collect();
        w.write_image_data(&idx).unwrap();
    }
    let pal = decode(&d.join("palette.png"), &o).unwrap();
    assert_eq!(px(&pal, 8, 2, 1), [0, 0, 255], "opaque palette entry");
    assert_eq!(px(&pal, 8, 2, 6), [255, 255, 255], "transparent entry becomes the background");

    // Grey + alpha: half-transparent black over white is mid-grey.
    image::DynamicImage::ImageLumaA8(image::ImageBuffer::from_pixel(8, 8, image::LumaA([0u8, 128]))).save(d.join("ga.png")).unwrap();
    let v = px(&decode(&d.join("ga.png"), &o).unwrap(), 8, 4, 4);
    assert!(near(v, [127, 127, 127], 1), "{v:?}");

    // CMYK JPEG (as print workflows write them): converted to RGB. Pure cyan → (0, 255, 255).
    {
        let cmyk: Vec<u8> = (0..16 * 16).flat_map(|_| [255u8, 0, 0, 0]).collect();
        jpeg_encoder::Encoder::new_file(d.join("cmyk.jpg"), 95).unwrap().encode(&cmyk, 16, 16, jpeg_encoder::ColorType::Cmyk).unwrap();
    }
    let c = px(&decode(&d.join("cmyk.jpg"), &opts(16)).unwrap(), 16, 8, 8);
    assert!(near(c, [0, 255, 255], 12) || near(c, [255, 0, 0], 12), "CMYK cyan decoded as {c:?}");
    assert!(near(c, [0, 255, 255], 12), "CMYK cyan must come out cyan (not inverted), got {c:?}");

    // EXIF orientation 6 (stored sideways, shown turned 90° clockwise): the stored left half
    // (red) ends up on top, the right half (blue) at the bottom.
    exif_jpeg(&d.join("rotated.jpg"), 64, 32, [220, 0, 0], [0, 0, 220], 6);
    let r = decode(&d.join("rotated.jpg"), &opts(32)).unwrap();
    // Upright it is 32×64, padded into 32×32 as 16×32 in the middle columns.
    assert!(near(px(&r, 32, 16, 4), [220, 0, 0], 40), "top {:?}", px(&r, 32, 16, 4));
    assert!(near(px(&r, 32, 16, 28), [0, 0, 220], 40), "bottom {:?}", px(&r, 32, 16, 28));
    assert_eq!(px(&r, 32, 2, 16), [255, 255, 255], "padding at the sides");

    // Animated GIF: the first frame (red), not the second (blue).
    {
        let f = std::fs::File::create(d.join("anim.gif")).unwrap();
        let mut g = image::codecs::gif::GifEncoder::new(f);
        for rgb in [[255u8, 0, 0], [0, 0, 255]] {
            let fr = image::Frame::new(image::RgbaImage::from_pixel(8, 8, image::Rgba([rgb[0], rgb[1], rgb[2], 255])));
            g.encode_frame(fr).unwrap();
        }
    }
    assert!(near(px(&decode(&d.join("anim.gif"), &o).unwrap(), 8, 4, 4), [255, 0, 0], 8));

    // 1×1 fills the square; 10000×10 becomes a thin centred band on the background.
    solid_png(&d.join("dot.png"), 1, 1, [0, 200, 0]);
    let dot = decode(&d.join("dot.png"), &o).unwrap();
    assert!((0..8).all(|y| (0..8).all(|x| px(&dot, 8, x, y) == [0, 200, 0])));
    solid_png(&d.join("long.png"), 10_000, 10, [0, 0, 0]);
    let long = decode(&d.join("long.png"), &o).unwrap();
    assert!(near(px(&long, 8, 4, 4), [0, 0, 0], 30) || near(px(&long, 8, 4, 3), [0, 0, 0], 30), "the band is in the middle");
    assert_eq!(px(&long, 8, 4, 0), [255, 255, 255]);
    assert_eq!(px(&long, 8, 4, 7), [255, 255, 255]);
}

/// A folder of good images plus every kind of bad entry; returns the names of the bad ones.
fn hostile_folder(root: &Path) -> Vec<String> {
    std::fs::create_dir_all(root.join("nested")).unwrap();
    for i in 0..12u8 {
        solid_png(&root.join(format!("good{i}.png")), 8, 8, [i * 20, 100, 50]);
    }
    // A non-UTF-8 name is just another file.
    use std::os::unix::ffi::OsStrExt;
    solid_png(&root.join(std::ffi::OsStr::from_bytes(b"caf\xe9.png")), 8, 8, [1, 2, 3]);
    std::fs::write(root.join("zero.png"), b"").unwrap();
    std::fs::write(root.join("text.png"), b"not an image").unwrap();
    bomb_png(&root.join("nested/bomb.png"), 50_000, 50_000);
    // A dangling link: cannot be read (reported while listing the folder).
    std::os::unix::fs::symlink(root.join("gone.png"), root.join("dangling.png")).unwrap();
    // A symlink loop and a file that isn't an image by name are ignored with a warning / silently.
    std::os::unix::fs::symlink(root, root.join("nested/loop")).unwrap();
    std::fs::write(root.join("notes.txt"), b"a file that is not an image").unwrap();
    vec!["zero.png".into(), "text.png".into(), "bomb.png".into()]
}

fn folder_run(root: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "pipelines/irasutoya_small.ron",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        "3",
        "--set",
        "d_step.model=Dcgan(width: 4)",
        "--set",
        "g_step.model=Dcgan(width: 4)",
        "--set",
        "loader.size=8",
        "--set",
        "loader.batch=4",
        "--set",
        "sampler.grid=2",
        "--set",
        "checkpoint=None",
    ];
    let root_set = format!("loader.root={}", root.display());
    args.extend(["--set", &root_set]);
    args.extend(extra);
    run(&args)
}

#[test]
fn image_folders_with_bad_entries_skip_or_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pics");
    let bad = hostile_folder(&root);
    // Skip (the default): the run goes on, and says how many files were skipped and which.
    let o = folder_run(&root, &tmp.path().join("skip"), &[]);
    expect(&o, 0, &["done: 3 steps", "skipped 3 unreadable files (first: "]);
    assert!(stderr(&o).contains("dangling.png: No such file or directory"), "{}", stderr(&o));
    for b in &bad {
        assert!(
            stderr(&o).contains(&format!("skipping {}", root.join(if b == "bomb.png" { "nested/bomb.png" } else { b }).display())),
            "{b}: {}",
            stderr(&o)
        );
    }
    assert!(stderr(&o).contains("more than max_pixels"), "{}", stderr(&o));
    assert!(stderr(&o).contains("loop"), "the symlink loop is reported: {}", stderr(&o));
    // Fail: the run stops at the first bad entry (here the symlink loop, found while listing),
    // naming it (exit 1), and its outputs are valid.
    let out = tmp.path().join("fail");
    let o = folder_run(&root, &out, &["--set", "loader.on_bad_file=Fail"]);
    expect(&o, 1, &["stage `loader` failed: ", &root.display().to_string(), "cannot read part of", "loop", "(on_bad_file: Fail)"]);
    assert!(out.join("stats.json").exists());

    // A file without read permission (only when not running as root, who reads anything).
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let locked = root.join("locked.png");
        solid_png(&locked, 8, 8, [9, 9, 9]);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        let o = folder_run(&root, &tmp.path().join("perm"), &[]);
        expect(&o, 0, &["locked.png", "Permission denied"]);
    }

    // An empty folder, and one with only non-image files: refused before anything runs.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = folder_run(&empty, &tmp.path().join("e"), &[]);
    expect(&o, 2, &["no images (png, jpg, jpeg, gif, webp, bmp) found under", &empty.display().to_string()]);
    std::fs::write(empty.join("readme.txt"), b"x").unwrap();
    std::fs::write(empty.join("data.csv"), b"1,2").unwrap();
    let o = folder_run(&empty, &tmp.path().join("e2"), &[]);
    expect(&o, 2, &["no images"]);
    // Only broken images: the run fails naming the folder and some files.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for i in 0..5 {
        std::fs::write(broken.join(format!("b{i}.png")), b"nope").unwrap();
    }
    let o = folder_run(&broken, &tmp.path().join("b"), &[]);
    expect(&o, 1, &["none of the 5 image files could be decoded (first: "]);
}

#[test]
fn broken_idx_files_are_named_with_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, write: &dyn Fn(&Path)| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir);
        let root = format!("loader.root={}", dir.display());
        mnist_run(&tmp.path().join(format!("{name}-run")), &["--max-steps", "2", "--set", &root])
    };
    let images = |d: &Path| d.join("train-images-idx3-ubyte");
    let o = case("magic", &|d| common::write_idx(&images(d), 0x1234_5678, &[2, 28, 28], &[0; 2 * 784]));
    expect(&o, 2, &["train-images-idx3-ubyte", "expected magic 0x00000803, found 0x12345678"]);
    let o = case("dtype", &|d| common::write_idx(&images(d), 0x0000_0D03, &[2, 28, 28], &[0; 8 * 784]));
    expect(&o, 2, &["train-images-idx3-ubyte", "unsupported IDX data type 0x0D"]);
    let o = case("short", &|d| common::write_idx(&images(d), 0x803, &[100, 28, 28], &[0; 3 * 784]));
    expect(&o, 2, &["train-images-idx3-ubyte", "declares 100 images of 28×28 = 78400 bytes but has 2352"]);
    let o = case("labels", &|d| {
        common::write_idx(&images(d), 0x803, &[100, 28, 28], &[0; 100 * 784]);
        common::write_idx(&d.join("train-labels-idx1-ubyte"), 0x801, &[90], &[0; 90]);
    });
    expect(&o, 2, &["train-images-idx3-ubyte", "has 100 images but its label file", "train-labels-idx1-ubyte has 90 labels"]);
    let o = case("gz", &|d| {
        let mut z = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
        let mut raw = 0x803u32.to_be_bytes().to_vec();
        for v in [100u32, 28, 28] {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        raw.extend(std::iter::repeat_n(7u8, 100 * 784));
        z.write_all(&raw).unwrap();
        let mut gz = z.finish().unwrap();
        let n = gz.len();
        gz[n / 2] ^= 0xFF;
        gz[n / 2 + 1] ^= 0xFF;
        std::fs::write(d.join("train-images-idx3-ubyte.gz"), gz).unwrap();
    });
    expect(&o, 2, &["train-images-idx3-ubyte.gz"]);
    assert!(stderr(&o).contains("gzip") || stderr(&o).contains("corrupt"), "{}", stderr(&o));
}

#[test]
fn pipeline_files_that_are_not_pipelines() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.ron");
    std::fs::write(&f, b"Pipeline(name: \"caf\xe9\")").unwrap();
    expect(&run(&["check", f.to_str().unwrap()]), 2, &["p.ron: not UTF-8 text"]);
    std::fs::write(&f, b"").unwrap();
    expect(&run(&["check", f.to_str().unwrap()]), 2, &["p.ron: empty file: expected `Pipeline(name: ..., stages: [...])`"]);
    std::fs::write(&f, b"   \n// only a comment\n").unwrap();
    expect(&run(&["check", f.to_str().unwrap()]), 2, &["p.ron"]);
    // 10 MB: refused at once rather than parsed.
    let mut big = b"Pipeline(name: \"big\", stages: [])\n".to_vec();
    big.extend(std::iter::repeat_n(b'/', 10_000_000));
    std::fs::write(&f, &big).unwrap();
    let t = std::time::Instant::now();
    expect(&run(&["check", f.to_str().unwrap()]), 2, &["p.ron: the file is 10.0 MB; a pipeline file is a few KB"]);
    assert!(t.elapsed().as_secs() < 5);
    // Not a file at all: a folder, an endless device, a named pipe (never opened, so no hang).
    expect(&run(&["check", tmp.path().to_str().unwrap()]), 2, &["a folder, not a pipeline file"]);
    let zero = tmp.path().join("zero.ron");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    expect(&run(&["check", zero.to_str().unwrap()]), 2, &["zero.ron: not a regular file (a device or a pipe?)"]);
    let fifo = tmp.path().join("fifo.ron");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    expect(&run(&["check", fifo.to_str().unwrap()]), 2, &["fifo.ron: not a regular file"]);
}

#[test]
fn command_line_mistakes_exit_2_with_a_clear_message() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&["run", "pipelines/mnist_mlp.ron", "--max-stpes", "3"]);
    expect(&o, 2, &["unexpected argument '--max-stpes'", "--max-steps"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--max-steps", "0"]), 2, &["--max-steps must be ≥ 1"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--max-steps", "-3"]), 2, &["unexpected argument '-3'"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--max-steps", "many"]), 2, &["invalid value 'many' for '--max-steps <MAX_STEPS>'"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--set", "d_stepp.n_critic=2"]), 2, &["no stage named `d_stepp`"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--set", "d_step.n_critci=2"]), 2, &["n_critci", "n_critic"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--set", "d_step.n_critic=lots"]), 2, &["--set d_step.n_critic=lots"]);
    expect(&run(&["run", "pipelines/mnist_mlp.ron", "--set", "nonsense"]), 2, &["expected STAGE.FIELD=VALUE"]);
    // --out naming a regular file; a folder that cannot be created.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    expect(&mnist_run(&file, &["--max-steps", "2"]), 2, &["exists and is not a folder"]);
    expect(&mnist_run(&file.join("below"), &["--max-steps", "2"]), 2, &["cannot create the run folder"]);
    expect(&mnist_run(Path::new("/proc/pipe-cannot-write-here"), &["--max-steps", "2"]), 2, &["cannot create the run folder"]);
    // A sample grid that could never be drawn is refused before training.
    let o = run(&["check", "pipelines/irasutoya_small.ron", "--set", "loader.size=2048", "--set", "sampler.grid=16"]);
    expect(&o, 2, &["a grid of 16 × 16 images of 2048×2048 (from stage `loader`) would be 32802×32802", "use a smaller `grid`"]);
}

#[test]
fn a_full_stderr_or_a_file_size_limit_does_not_kill_the_run() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    // Logging to a full disk: the run still finishes and writes everything.
    let out = tmp.path().join("quiet");
    let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap(), "--max-steps", "20"];
    args.extend(TINY);
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = pipe().args(&args).stderr(full).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    for f in ["metrics.csv", "loss.png", "stats.json", "checkpoints/step_00000020.safetensors"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // ulimit -f: writes past the limit fail (EFBIG) and are reported like a full disk, instead
    // of SIGXFSZ killing the process.
    let out = tmp.path().join("limited");
    let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap(), "--max-steps", "20", "--checkpoint-every", "10"];
    args.extend(TINY);
    let mut cmd = pipe();
    cmd.args(&args);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 200 * 1024, rlim_max: 200 * 1024 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    expect(&o, 1, &["stage `g_step` failed: ", "step_00000010.safetensors: cannot write the checkpoint: File too large"]);
    assert!(!out.join("checkpoints/.step_00000010.safetensors.partial").exists(), "no partial file left");
}

// Needs the fault-injection hooks (scripts/test.sh builds them in).
#[cfg(feature = "fault-injection")]
#[test]
fn non_finite_losses_stop_or_skip_and_never_reach_a_checkpoint() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    let with_nan = |out: &Path, at: &str, extra: &[&str]| {
        let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap(), "--checkpoint-every", "10"];
        args.extend(TINY);
        args.extend(extra);
        pipe().args(&args).env("PIPE_TEST_NONFINITE", at).output().unwrap()
    };
    // Stop (default): the step and the stage are named; the checkpoints written are finite.
    let a = tmp.path().join("a");
    let o = with_nan(&a, "d_step:23", &["--max-steps", "40"]);
    expect(&o, 1, &["stage `d_step` failed: step 23: non-finite discriminator loss (NaN)", "on_nonfinite: Skip"]);
    let b = tmp.path().join("b");
    let o = with_nan(&b, "g_step:17", &["--max-steps", "40"]);
    expect(&o, 1, &["stage `g_step` failed: step 17: non-finite generator loss (NaN)"]);
    for (dir, last) in [(&a, 20), (&b, 10)] {
        let cks = pipe_stages::io::checkpoint::list(&dir.join("checkpoints"));
        assert_eq!(cks.last().map(|c| c.0), Some(last), "{cks:?}");
        let png = dir.join("s.png");
        let o = run(&["sample", dir.to_str().unwrap(), "--out", png.to_str().unwrap(), "--device", "cpu"]);
        assert_eq!(o.status.code(), Some(0), "the last checkpoint is usable: {}", stderr(&o));
    }
    // Skip: a warning, the run goes on to the end.
    let c = tmp.path().join("c");
    let o = with_nan(&c, "d_step:12", &["--max-steps", "30", "--set", "on_nonfinite=Skip"]);
    expect(&o, 0, &["warning: d_step: step 12: non-finite discriminator loss or gradient: update skipped (1 so far)", "done: 30 steps"]);
    // Skip, but every update from step 5 on is non-finite: it gives up after 20 in a row.
    let d = tmp.path().join("d");
    let o = with_nan(&d, "g_step:5..", &["--max-steps", "100", "--set", "on_nonfinite=Skip"]);
    expect(&o, 1, &["stage `g_step` failed: step 24: 20 updates in a row had a non-finite generator loss or gradient and were skipped: training has diverged"]);
}

#[test]
#[cfg(feature = "fault-injection")]
fn a_full_disk_is_reported_and_earlier_checkpoints_stay_loadable() {
    mnist_root();
    let tmp = tempfile::tempdir().unwrap();
    // Writing to /dev/full fails with ENOSPC, as a full disk does. Atomic writes use temporary
    // files of unique names, so the test hook PIPE_TEST_FULL_DISK=SUFFIX sends the write of the
    // file ending with SUFFIX there; the video streams to `progress.mp4.partial`, made a link.
    for (name, victim, stage) in [
        ("grid", "samples/step_00000020.png", "sampler"),
        ("video", "progress.mp4.partial", "video"),
        ("ckpt", "checkpoints/step_00000020.safetensors", "g_step"),
    ] {
        let out = tmp.path().join(name);
        std::fs::create_dir_all(out.join("samples")).unwrap();
        std::fs::create_dir_all(out.join("checkpoints")).unwrap();
        let mut args = vec!["run", "pipelines/mnist_mlp.ron", "--out", out.to_str().unwrap()];
        args.extend(TINY);
        args.extend(["--max-steps", "30", "--checkpoint-every", "10", "--set", "sampler.every=10"]);
        let mut cmd = pipe();
        cmd.args(&args);
        if name == "video" {
            std::os::unix::fs::symlink("/dev/full", out.join(victim)).unwrap();
        } else {
            cmd.env("PIPE_TEST_FULL_DISK", victim);
        }
        let o = cmd.output().unwrap();
        expect(&o, 1, &[&format!("stage `{stage}` failed: "), "No space left on device"]);
        // No temporary file is left behind by the failed write.
        let dir = out.join(Path::new(victim).parent().unwrap());
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n.ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{name}: {left:?}");
        // The checkpoint of step 10 (written before the disk filled) still loads.
        let png = out.join("s.png");
        let ck = out.join("checkpoints/step_00000010.safetensors");
        let o = run(&["sample", ck.to_str().unwrap(), "--out", png.to_str().unwrap(), "--device", "cpu"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        // The grids written before are intact PNGs.
        assert!(image::open(out.join("samples/step_00000010.png")).is_ok(), "{name}");
    }
}

#[test]
fn out_of_memory_names_the_stage_and_suggests_a_smaller_batch() {
    let tmp = tempfile::tempdir().unwrap();
    // 2,000,000 images of 2×2 pixels (a 8 MB IDX file, gzipped to almost nothing) in one batch:
    // D's first layer of 65,536 units would need 2·10⁶ × 65,536 × 4 bytes ≈ 524 GB.
    let dir = tmp.path().join("many");
    std::fs::create_dir_all(&dir).unwrap();
    let n = 2_000_000u32;
    let mut z =
        flate2::write::GzEncoder::new(std::fs::File::create(dir.join("train-images-idx3-ubyte.gz")).unwrap(), flate2::Compression::fast());
    for v in [0x803u32, n, 2, 2] {
        z.write_all(&v.to_be_bytes()).unwrap();
    }
    z.write_all(&vec![128u8; n as usize * 4]).unwrap();
    z.finish().unwrap();
    let root = format!("loader.root={}", dir.display());
    // mnist_mlp without its eval stage (LeNet features can't take 2×2 images).
    let file = tmp.path().join("mnist_mlp.ron");
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mnist_mlp.ron")).unwrap();
    std::fs::write(&file, common::without_eval(&text)).unwrap();
    let o = run(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        tmp.path().join("run").to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--set",
        &root,
        "--set",
        "loader.batch=2000000",
        "--set",
        "loader.shuffle=false",
        "--set",
        "augment.perturb=Off",
        "--set",
        "d_step.penalty=None",
        "--set",
        "d_step.model=Mlp(hidden: 65536, layers: 1)",
        "--set",
        "g_step.model=Mlp(hidden: 8, layers: 1)",
    ]);
    expect(
        &o,
        1,
        &["stage `d_step` failed: out of memory at step 1", "with batches of 2000000 images: use a smaller `batch` in the loader"],
    );
    // Models that cannot fit at all are refused before they are built (no kill by the kernel).
    let o = mnist_run(&tmp.path().join("huge"), &["--max-steps", "2", "--set", "d_step.model=Mlp(hidden: 65536, layers: 16)"]);
    expect(&o, 2, &["the models need about", "choose smaller models"]);
}

#[test]
fn a_metrics_file_that_cannot_be_written_fails_cleanly() {
    // metrics.csv is a folder: the run stops before any stage starts, exit 1, no crash.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir_all(out.join("metrics.csv")).unwrap();
    let o = mnist_run(&out, &["--max-steps", "5", "--overwrite"]);
    expect(&o, 1, &["metrics.csv: Is a directory"]);
}
