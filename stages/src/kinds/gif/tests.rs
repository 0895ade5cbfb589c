//! Tests of the parent module.

use super::*;
use crate::core::item::HostBatch;
use crate::core::stage::{Bus, BusMessage};
use crossbeam_channel::{bounded, unbounded};
use image::AnimationDecoder;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A frame in one solid colour that depends on `k`.
fn solid(step: u64, w: u32, h: u32, k: u32) -> Frame {
    Frame { step, width: w, height: h, rgb: colour(k).repeat((w * h) as usize) }
}

fn colour(k: u32) -> [u8; 3] {
    [(k * 37 % 256) as u8, (255 - k * 11 % 256) as u8, (k * 101 % 256) as u8]
}

/// The frames of a GIF file: (RGBA picture, delay in ms).
fn decode(path: &Path) -> Vec<(image::RgbaImage, u32)> {
    let f = std::io::BufReader::new(File::open(path).unwrap());
    let d = image::codecs::gif::GifDecoder::new(f).unwrap();
    d.into_frames()
        .collect_frames()
        .unwrap()
        .into_iter()
        .map(|fr| {
            let (n, dd) = fr.delay().numer_denom_ms();
            (fr.into_buffer(), n / dd)
        })
        .collect()
}

fn close(a: &[u8], b: &[u8], tol: i32) -> bool {
    a.iter().zip(b).all(|(&x, &y)| (i32::from(x) - i32::from(y)).abs() <= tol)
}

fn run_stage(gif: Gif, items: Vec<Item>) -> (Result<(), StageError>, Vec<BusMessage>) {
    let (tx, rx) = bounded(2);
    let (btx, brx) = unbounded();
    let ctx = StageContext {
        name: "gif".into(),
        input: Some(rx),
        outputs: vec![],
        bus: Bus::new(btx, "gif"),
        abort: Arc::new(AtomicBool::new(false)),
        drain: Arc::new(AtomicBool::new(false)),
        stats: Default::default(),
        panic_after: None,
        records: None,
    };
    let handle = std::thread::spawn(move || Box::new(gif).run(ctx));
    for it in items {
        if tx.send(it).is_err() {
            break;
        }
    }
    drop(tx);
    let r = handle.join().unwrap();
    (r, brx.try_iter().collect())
}

#[test]
fn config_defaults_and_validation_name_every_field() {
    let d = GifConfig::default();
    assert_eq!((d.path.as_path(), d.fps, d.max_frames, d.max_side, d.hold_last_ms), (Path::new("progress.gif"), 4, 24, 512, 2000));
    let j: GifConfig = serde_json::from_str(r#"{"max_frames": 10}"#).unwrap();
    assert_eq!(j, GifConfig { max_frames: 10, ..Default::default() });
    assert!(serde_json::from_str::<GifConfig>(r#"{"frames": 10}"#).is_err());
    assert!(d.validate().is_ok());
    let bad = GifConfig { path: "x.mp4".into(), fps: 0, max_frames: 1, max_side: 8, hold_last_ms: 60_001 };
    let e = bad.validate().unwrap_err().to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 5, "{e}");
    for want in [
        "`fps` is 0, expected 1 to 50",
        "`max_frames` is 1, expected 2 to 1000",
        "`max_side` is 8, expected 16 to 4096 pixels",
        "`hold_last_ms` is 60001, expected 0 to 60000 ms",
        "`path` is \"x.mp4\"",
    ] {
        assert!(lines.iter().any(|l| l.contains(want)), "{want}: {e}");
    }
    let e = GifConfig { fps: 51, max_frames: 1001, max_side: 4097, ..Default::default() }.validate().unwrap_err().to_string();
    assert!(e.contains("`fps` is 51") && e.contains("`max_frames` is 1001") && e.contains("`max_side` is 4097"), "{e}");
    assert!(GifConfig { path: "../a.gif".into(), ..Default::default() }.validate().unwrap_err().to_string().contains("without `..`"));
    assert!(GifConfig { path: "".into(), ..Default::default() }.validate().unwrap_err().to_string().contains("`path` is empty"));
    let run = tempfile::tempdir().unwrap();
    assert!(build(&GifConfig { fps: 0, ..Default::default() }, run.path(), 10).is_err());
    let g = build(&GifConfig { path: "out/g.GIF".into(), ..Default::default() }, run.path(), 10).unwrap();
    assert!(run.path().join("out").is_dir());
    assert_eq!(g.path(), run.path().join("out/g.GIF"));
    assert_eq!(g.partial_path(), run.path().join("out/g.GIF.partial"));
    assert_eq!(g.expected_frames(), 10);
}

#[test]
fn stride_and_sizes() {
    assert_eq!(stride(100, 10), 11);
    assert_eq!(stride(10, 10), 1);
    assert_eq!(stride(11, 10), 2);
    assert_eq!(stride(40, 40), 1);
    assert_eq!(stride(79, 40), 2);
    assert_eq!(stride(0, 40), 1);
    assert_eq!(stride(1, 40), 1);
    assert_eq!(stride(1000, 2), 999);
    // However many are expected, the kept ones before the last and the last fit the cap.
    for m in [2u32, 3, 5, 10, 40] {
        for e in 1..500u64 {
            let kept = (e - 1).div_ceil(stride(e, m)) + 1;
            assert!(kept <= u64::from(m), "expected {e}, max_frames {m}: {kept}");
            if e <= u64::from(m) {
                assert_eq!(kept, e);
            }
        }
    }
    assert_eq!(scaled_size(1000, 500, 512), (512, 256));
    assert_eq!(scaled_size(500, 1000, 512), (256, 512));
    assert_eq!(scaled_size(242, 242, 512), (242, 242));
    assert_eq!(scaled_size(1090, 1090, 512), (512, 512));
    assert_eq!(scaled_size(4000, 3, 16), (16, 1));
    let c = GifConfig { fps: 3, hold_last_ms: 0, ..Default::default() };
    assert_eq!((c.frame_delay_ms(), c.last_delay_ms()), (333, 333));
}

#[test]
fn a_hundred_frames_make_at_most_max_frames_ending_with_the_last() {
    let run = tempfile::tempdir().unwrap();
    let cfg = GifConfig { max_frames: 10, ..Default::default() };
    let gif = build(&cfg, run.path(), 100).unwrap();
    let path = gif.path().to_path_buf();
    let items = (0..100).map(|k| Item::Frame(solid(k as u64 + 1, 40, 30, k))).collect();
    let (r, bus) = run_stage(gif, items);
    r.unwrap();
    assert!(bus.iter().any(|m| matches!(m, BusMessage::Wrote { path: p, .. } if *p == path)), "{bus:?}");
    assert!(!run.path().join("progress.gif.partial").exists());
    let frames = decode(&path);
    // Stride ⌈99 / 9⌉ = 11: frames 0, 11, …, 88, and the last (99).
    let want: Vec<u32> = (0..100).step_by(11).collect();
    assert_eq!(want.last(), Some(&99));
    assert_eq!(frames.len(), want.len());
    assert_eq!(frames.len(), 10);
    for ((img, delay), (i, &k)) in frames.iter().zip(want.iter().enumerate()) {
        assert_eq!(img.dimensions(), (40, 30));
        assert!(
            close(&img.get_pixel(5, 5).0[..3], &colour(k), 8),
            "frame {i} (input {k}): {:?} vs {:?}",
            img.get_pixel(5, 5),
            colour(k)
        );
        assert_eq!(*delay, if i == 9 { 2000 } else { 250 }, "frame {i}");
    }
}

#[test]
fn the_cap_holds_when_more_frames_arrive_than_expected() {
    let run = tempfile::tempdir().unwrap();
    let cfg = GifConfig { max_frames: 5, hold_last_ms: 0, fps: 10, ..Default::default() };
    // Expected 10 (stride ⌈9 / 4⌉ = 3), but 30 arrive: frames 0, 3, 6, 9 and then only the last.
    let gif = build(&cfg, run.path(), 10).unwrap();
    let path = gif.path().to_path_buf();
    let (r, _) = run_stage(gif, (0..30).map(|k| Item::Frame(solid(k as u64, 20, 20, k))).collect());
    r.unwrap();
    let frames = decode(&path);
    assert_eq!(frames.len(), 5);
    for (img, k) in frames.iter().zip([0, 3, 6, 9, 29]) {
        assert!(close(&img.0.get_pixel(3, 3).0[..3], &colour(k), 8), "input {k}");
    }
    // hold_last_ms 0: the last frame lasts as long as the others.
    assert!(frames.iter().all(|f| f.1 == 100), "{:?}", frames.iter().map(|f| f.1).collect::<Vec<_>>());
    // Fewer than expected: every kept one and the last.
    let run = tempfile::tempdir().unwrap();
    let gif = build(&cfg, run.path(), 10).unwrap();
    let path = gif.path().to_path_buf();
    let (r, _) = run_stage(gif, (0..5).map(|k| Item::Frame(solid(k as u64, 20, 20, k))).collect());
    r.unwrap();
    assert_eq!(decode(&path).len(), 3, "frames 0, 3 and 4");
    // A single frame.
    let run = tempfile::tempdir().unwrap();
    let gif = build(&GifConfig::default(), run.path(), 10).unwrap();
    let path = gif.path().to_path_buf();
    run_stage(gif, vec![Item::Frame(solid(1, 20, 20, 1))]).0.unwrap();
    assert_eq!(decode(&path).iter().map(|f| f.1).collect::<Vec<_>>(), vec![2000]);
}

#[test]
fn large_frames_are_downscaled_keeping_the_aspect_ratio() {
    let run = tempfile::tempdir().unwrap();
    let gif = build(&GifConfig::default(), run.path(), 2).unwrap();
    let path = gif.path().to_path_buf();
    // Left half one colour, right half another.
    let half = |k: u32| {
        let mut f = solid(k as u64, 1000, 500, k);
        for y in 0..500usize {
            for x in 500..1000usize {
                f.rgb[(y * 1000 + x) * 3..][..3].copy_from_slice(&colour(k + 50));
            }
        }
        f
    };
    let (r, bus) = run_stage(gif, vec![Item::Frame(half(1)), Item::Frame(half(2))]);
    r.unwrap();
    assert!(!bus.iter().any(|m| matches!(m, BusMessage::Warning { .. })), "same-size frames need no warning: {bus:?}");
    let frames = decode(&path);
    assert_eq!(frames.len(), 2);
    for (i, (img, _)) in frames.iter().enumerate() {
        let k = i as u32 + 1;
        assert_eq!(img.dimensions(), (512, 256));
        assert!(close(&img.get_pixel(100, 128).0[..3], &colour(k), 8), "{:?}", img.get_pixel(100, 128));
        assert!(close(&img.get_pixel(400, 128).0[..3], &colour(k + 50), 8), "{:?}", img.get_pixel(400, 128));
    }
}

#[test]
fn a_frame_of_another_size_is_scaled_to_the_gif_with_a_warning() {
    let run = tempfile::tempdir().unwrap();
    let gif = build(&GifConfig::default(), run.path(), 3).unwrap();
    let path = gif.path().to_path_buf();
    let items = vec![Item::Frame(solid(1, 64, 48, 1)), Item::Frame(solid(2, 100, 30, 2)), Item::Frame(solid(3, 64, 48, 3))];
    let (r, bus) = run_stage(gif, items);
    r.unwrap();
    let warnings: Vec<&String> =
        bus.iter().filter_map(|m| if let BusMessage::Warning { msg, .. } = m { Some(msg) } else { None }).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("100×30") && warnings[0].contains("64×48"), "{warnings:?}");
    let frames = decode(&path);
    assert_eq!(frames.len(), 3);
    assert!(frames.iter().all(|f| f.0.dimensions() == (64, 48)));
    assert!(close(&frames[1].0.get_pixel(30, 20).0[..3], &colour(2), 8));
}

#[test]
fn the_file_is_a_complete_gif_after_every_frame() {
    let run = tempfile::tempdir().unwrap();
    let path = run.path().join("progress.gif");
    let partial = partial_path(&path);
    // An older GIF at the final path stays until the new one has a frame.
    std::fs::write(&path, b"old").unwrap();
    let cfg = GifConfig { hold_last_ms: 1000, ..Default::default() };
    let mut w = GifWriter::new(&cfg, &path, 6);
    w.push(solid(1, 32, 24, 1)).unwrap();
    // The first frame is held until the next one arrives.
    assert_eq!(w.written(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert!(!partial.exists());
    for k in 2..=6u32 {
        w.push(solid(k as u64, 32, 24, k)).unwrap();
        assert_eq!(w.written(), k - 1);
        assert!(!partial.exists());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.last(), Some(&TRAILER));
        let frames = decode(&path);
        assert_eq!(frames.len(), k as usize - 1, "after frame {k}");
        let (img, delay) = frames.last().unwrap();
        assert!(close(&img.get_pixel(1, 1).0[..3], &colour(k - 1), 8));
        assert_eq!(*delay, 250);
    }
    // A malformed frame is refused; the GIF on disk is untouched.
    let before = std::fs::read(&path).unwrap();
    let e = w.push(Frame { step: 9, width: 4, height: 4, rgb: vec![0; 3] }).unwrap_err().to_string();
    assert!(e.contains("step 9"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    w.finish().unwrap();
    let frames = decode(&path);
    assert_eq!(frames.len(), 6);
    assert_eq!(frames.last().unwrap().1, 1000);
    assert!(close(&frames[5].0.get_pixel(1, 1).0[..3], &colour(6), 8));
    // Finishing again (the drop guard) changes nothing.
    let bytes = std::fs::read(&path).unwrap();
    w.finish().unwrap();
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn dropping_a_writer_writes_the_held_frame() {
    // What runs when the stage thread panics.
    let run = tempfile::tempdir().unwrap();
    let path = run.path().join("p.gif");
    let mut w = GifWriter::new(&GifConfig::default(), &path, 3);
    w.push(solid(1, 16, 16, 1)).unwrap();
    w.push(solid(2, 16, 16, 2)).unwrap();
    drop(w);
    let frames = decode(&path);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1].1, 2000);
}

#[test]
fn prefix_frames_start_the_gif_and_count_for_the_cap() {
    let run = tempfile::tempdir().unwrap();
    let samples = run.path().join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    let mut pngs = vec![];
    for k in 1..=4u32 {
        let f = solid(k as u64 * 10, 24, 24, k);
        let p = samples.join(format!("step_{:08}.png", k * 10));
        RgbImage::from_raw(24, 24, f.rgb).unwrap().save(&p).unwrap();
        pngs.push(p);
    }
    // A missing one is skipped with a warning.
    pngs.insert(2, samples.join("step_00000025.png"));
    // An older GIF is replaced.
    std::fs::write(run.path().join("progress.gif"), b"old").unwrap();
    let cfg = GifConfig { max_frames: 4, ..Default::default() };
    // 4 prefix + 2 new = 6 expected: stride ⌈5 / 3⌉ = 2 → frames 0, 2, 4 and the last (5).
    let gif = build(&cfg, run.path(), 6).unwrap().with_prefix(pngs);
    let path = gif.path().to_path_buf();
    let (r, bus) = run_stage(gif, vec![Item::Frame(solid(50, 24, 24, 5)), Item::Frame(solid(60, 24, 24, 6))]);
    r.unwrap();
    assert!(bus
        .iter()
        .any(|m| matches!(m, BusMessage::Warning { msg, .. } if msg.contains("step_00000025.png") && msg.contains("GIF"))));
    let frames = decode(&path);
    assert_eq!(frames.len(), 4);
    for (img, k) in frames.iter().zip([1, 3, 5, 6]) {
        assert!(close(&img.0.get_pixel(2, 2).0[..3], &colour(k), 8), "input {k}");
    }
}

#[test]
fn wrong_items_and_no_frames() {
    let run = tempfile::tempdir().unwrap();
    let gif = build(&GifConfig::default(), run.path(), 3).unwrap();
    let path = gif.path().to_path_buf();
    let batch = HostBatch { index: 0, epoch: 0, next_pos: 1, shape: [1, 1, 1, 1], x: vec![0.0], x_hat: None };
    let (r, bus) = run_stage(gif, vec![Item::Frame(solid(1, 16, 16, 1)), Item::Batch(batch)]);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("gif") && e.contains("`frame`") && e.contains("`batch`"), "{e}");
    // The frame before the error is in the GIF.
    assert_eq!(decode(&path).len(), 1);
    assert!(bus.iter().any(|m| matches!(m, BusMessage::Wrote { .. })));

    let run = tempfile::tempdir().unwrap();
    let gif = build(&GifConfig::default(), run.path(), 3).unwrap();
    let (r, bus) = run_stage(gif, vec![]);
    r.unwrap();
    assert!(!run.path().join("progress.gif").exists());
    assert!(bus.iter().any(|m| matches!(m, BusMessage::Warning { msg, .. } if msg.contains("no frames"))));
    assert!(!bus.iter().any(|m| matches!(m, BusMessage::Wrote { .. })));
}

#[test]
fn a_full_disk_leaves_no_broken_gif() {
    // Writing to /dev/full fails with ENOSPC, as a full disk does.
    if !Path::new("/dev/full").exists() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let path = run.path().join("progress.gif");
    std::os::unix::fs::symlink("/dev/full", partial_path(&path)).unwrap();
    let mut w = GifWriter::new(&GifConfig::default(), &path, 3);
    w.push(solid(1, 16, 16, 1)).unwrap();
    let e = w.push(solid(2, 16, 16, 2)).unwrap_err().to_string();
    assert!(e.contains("progress.gif.partial") && e.contains("No space left"), "{e}");
    assert!(!path.exists());
    assert!(!w.on_disk());
}
