//! Tests of the parent module.

#![cfg_attr(not(feature = "video"), allow(dead_code, unused_imports))]
use super::*;
use crate::core::item::HostBatch;
use crate::core::stage::{Bus, BusMessage};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Harness {
    tx: Option<Sender<Item>>,
    bus: Receiver<BusMessage>,
    abort: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<(), StageError>>,
}

fn start(stage: Video) -> Harness {
    let (tx, rx) = bounded(2);
    let (btx, brx) = unbounded();
    let abort = Arc::new(AtomicBool::new(false));
    let ctx = StageContext {
        name: "video".into(),
        input: Some(rx),
        outputs: vec![],
        bus: Bus::new(btx, "video"),
        abort: abort.clone(),
        drain: Arc::new(AtomicBool::new(false)),
        stats: Default::default(),
        panic_after: None,
        records: None,
    };
    let handle = std::thread::spawn(move || Box::new(stage).run(ctx));
    Harness { tx: Some(tx), bus: brx, abort, handle }
}

fn wrote(bus: &Receiver<BusMessage>) -> Vec<PathBuf> {
    bus.try_iter()
        .filter_map(|m| match m {
            BusMessage::Wrote { path, .. } => Some(path),
            _ => None,
        })
        .collect()
}

/// A frame in four solid quadrants whose colours depend on `k`.
fn quadrants(step: u64, w: u32, h: u32, k: u8) -> Frame {
    let cols = quad_colours(k);
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let q = usize::from(x >= w / 2) + 2 * usize::from(y >= h / 2);
            rgb.extend_from_slice(&cols[q]);
        }
    }
    Frame { step, width: w, height: h, rgb }
}

fn quad_colours(k: u8) -> [[u8; 3]; 4] {
    [[200, 30u8.wrapping_add(k * 10), 40], [20, 180, 60u8.wrapping_add(k * 20)], [50u8.wrapping_add(k * 15), 60, 220], [128, 128, 128]]
}

fn pixel(f: &Frame, x: u32, y: u32) -> [u8; 3] {
    let i = ((y * f.width + x) * 3) as usize;
    [f.rgb[i], f.rgb[i + 1], f.rgb[i + 2]]
}

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter().zip(b).all(|(&x, y)| (i32::from(x) - i32::from(y)).abs() <= tol)
}

#[test]
fn config_defaults_and_validation() {
    let d = VideoConfig::default();
    assert_eq!((d.path.as_path(), d.fps, d.crf, d.hold_last), (Path::new("progress.mp4"), 4, 18, 0));
    let j: VideoConfig = serde_json::from_str(r#"{"fps": 10}"#).unwrap();
    assert_eq!(j, VideoConfig { fps: 10, ..Default::default() });
    assert!(serde_json::from_str::<VideoConfig>(r#"{"fsp": 10}"#).is_err());
    let run = tempfile::tempdir().unwrap();
    for bad in [
        VideoConfig { fps: 0, ..Default::default() },
        VideoConfig { crf: 52, ..Default::default() },
        VideoConfig { hold_last: MAX_HOLD_LAST + 1, ..Default::default() },
    ] {
        assert!(build(&bad, run.path()).is_err(), "{bad:?}");
    }
    let v = build(&VideoConfig { path: "out/v.mp4".into(), ..Default::default() }, run.path()).unwrap();
    assert!(run.path().join("out").is_dir());
    assert_eq!(v.path(), run.path().join("out/v.mp4"));
    assert_eq!(v.partial_path(), run.path().join("out/v.mp4.partial"));
}

#[cfg(not(feature = "video"))]
#[test]
fn without_the_feature_the_stage_warns_and_drains() {
    let run = tempfile::tempdir().unwrap();
    let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
    let tx = h.tx.take().unwrap();
    for k in 0..3 {
        tx.send(Item::Frame(quadrants(k, 8, 8, 0))).unwrap();
    }
    drop(tx);
    h.handle.join().unwrap().unwrap();
    let warnings: Vec<String> = h
        .bus
        .try_iter()
        .filter_map(|m| match m {
            BusMessage::Warning { msg, .. } => Some(msg),
            _ => None,
        })
        .collect();
    assert_eq!(warnings, vec![NO_VIDEO_WARNING.to_string()]);
    assert!(!run.path().join("progress.mp4").exists());
    assert!(probe(&run.path().join("progress.mp4")).is_err());
    assert!(decode_frame(&run.path().join("progress.mp4"), 0).is_err());
}

#[cfg(feature = "video")]
fn encode(dir: &Path, name: &str, frames: Vec<Frame>, hold_last: u32) -> (PathBuf, Vec<BusMessage>) {
    let cfg = VideoConfig { path: name.into(), hold_last, ..Default::default() };
    let mut h = start(build(&cfg, dir).unwrap());
    let tx = h.tx.take().unwrap();
    for f in frames {
        tx.send(Item::Frame(f)).unwrap();
    }
    drop(tx);
    h.handle.join().unwrap().unwrap();
    (dir.join(name), h.bus.try_iter().collect())
}

#[cfg(feature = "video")]
#[test]
fn even_frames_encode_and_decode() {
    let run = tempfile::tempdir().unwrap();
    let frames: Vec<Frame> = (0..5).map(|k| quadrants(500 * (k + 1), 242, 242, k as u8)).collect();
    let (path, bus) = encode(run.path(), "progress.mp4", frames.clone(), 0);
    assert!(bus.iter().any(|m| matches!(m, BusMessage::Wrote { path: p, .. } if *p == path)));
    assert!(!run.path().join("progress.mp4.partial").exists());
    let info = probe(&path).unwrap();
    assert_eq!(info, VideoInfo { frames: 5, width: 242, height: 242, codec: "h264".into() });
    for k in [0u64, 2, 4] {
        let f = decode_frame(&path, k).unwrap();
        assert_eq!((f.width, f.height, f.step), (242, 242, k));
        let cols = quad_colours(k as u8);
        for (q, (x, y)) in [(60, 60), (180, 60), (60, 180), (180, 180)].into_iter().enumerate() {
            let got = pixel(&f, x, y);
            assert!(close(got, cols[q], 8), "frame {k} quadrant {q}: {got:?} vs {:?}", cols[q]);
        }
        // Whole-frame error is small too.
        let mad: f64 = f.rgb.iter().zip(&frames[k as usize].rgb).map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs()).sum::<f64>()
            / f.rgb.len() as f64;
        assert!(mad < 6.0, "frame {k}: mean abs difference {mad}");
    }
    assert!(decode_frame(&path, 5).unwrap_err().to_string().contains("5 frames"));
    // 5 frames at 4 fps last 1.25 s (each frame, the last included, lasts 1/fps).
    let secs = ffmpeg_next::format::input(&path).unwrap().duration() as f64 / 1e6;
    assert!((secs - 1.25).abs() < 0.01, "duration {secs} s");
}

#[cfg(feature = "video")]
#[test]
fn odd_frames_are_padded_to_even() {
    let run = tempfile::tempdir().unwrap();
    let frames: Vec<Frame> = (0..5).map(|k| quadrants(k + 1, 35, 21, k as u8)).collect();
    let (path, _) = encode(run.path(), "odd.mp4", frames, 0);
    let info = probe(&path).unwrap();
    assert_eq!(info, VideoInfo { frames: 5, width: 36, height: 22, codec: "h264".into() });
    let f = decode_frame(&path, 3).unwrap();
    let cols = quad_colours(3);
    // Padding repeats the last column and row: bottom-right quadrant colour.
    for (x, y) in [(30, 18), (35, 18), (30, 21), (35, 21)] {
        assert!(close(pixel(&f, x, y), cols[3], 10), "({x}, {y}): {:?}", pixel(&f, x, y));
    }
    assert!(close(pixel(&f, 5, 4), cols[0], 12), "{:?}", pixel(&f, 5, 4));
}

#[cfg(feature = "video")]
#[test]
fn hold_last_and_resized_frames() {
    let run = tempfile::tempdir().unwrap();
    let frames = vec![quadrants(1, 64, 48, 0), quadrants(2, 100, 30, 1), quadrants(3, 64, 48, 2)];
    let (path, bus) = encode(run.path(), "hold.mp4", frames, 3);
    let warnings: Vec<&String> = bus
        .iter()
        .filter_map(|m| match m {
            BusMessage::Warning { msg, .. } => Some(msg),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("100×30") && warnings[0].contains("scaled"));
    let info = probe(&path).unwrap();
    assert_eq!((info.frames, info.width, info.height), (6, 64, 48));
    let last = decode_frame(&path, 5).unwrap();
    assert!(close(pixel(&last, 10, 10), quad_colours(2)[0], 10));
}

#[cfg(feature = "video")]
#[test]
fn input_dropped_midway_still_finalises() {
    let run = tempfile::tempdir().unwrap();
    let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
    let tx = h.tx.take().unwrap();
    for k in 0..3 {
        tx.send(Item::Frame(quadrants(k, 128, 96, k as u8))).unwrap();
    }
    // The upstream goes away without ever ending its stream properly.
    drop(tx);
    h.handle.join().unwrap().unwrap();
    let path = run.path().join("progress.mp4");
    assert_eq!(wrote(&h.bus), vec![path.clone()]);
    assert_eq!(probe(&path).unwrap().frames, 3);
    assert!(!run.path().join("progress.mp4.partial").exists());
}

#[cfg(feature = "video")]
#[test]
fn abort_and_errors_still_finalise() {
    // Abort while the upstream is still connected (held frames are skipped then).
    let run = tempfile::tempdir().unwrap();
    let cfg = VideoConfig { hold_last: 5, ..Default::default() };
    let mut h = start(build(&cfg, run.path()).unwrap());
    let tx = h.tx.take().unwrap();
    for k in 0..2 {
        tx.send(Item::Frame(quadrants(k, 64, 64, 0))).unwrap();
    }
    // Wait until both frames are taken (the link holds 2) before aborting.
    while !tx.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    h.abort.store(true, Ordering::Relaxed);
    h.handle.join().unwrap().unwrap();
    drop(tx);
    assert_eq!(probe(&run.path().join("progress.mp4")).unwrap().frames, 2);

    // A wrong item: an error naming the stage and kinds, and a finalised video.
    let run = tempfile::tempdir().unwrap();
    let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
    let tx = h.tx.take().unwrap();
    tx.send(Item::Frame(quadrants(1, 64, 64, 0))).unwrap();
    let batch = HostBatch { index: 0, epoch: 0, next_pos: 1, shape: [1, 1, 1, 1], x: vec![0.0], x_hat: None };
    tx.send(Item::Batch(batch)).unwrap();
    let e = h.handle.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("video") && e.contains("`frame`") && e.contains("`batch`"), "{e}");
    assert_eq!(probe(&run.path().join("progress.mp4")).unwrap().frames, 1);

    // A malformed frame.
    let run = tempfile::tempdir().unwrap();
    let mut h = start(build(&VideoConfig::default(), run.path()).unwrap());
    let tx = h.tx.take().unwrap();
    tx.send(Item::Frame(quadrants(1, 64, 64, 0))).unwrap();
    tx.send(Item::Frame(Frame { step: 7, width: 4, height: 4, rgb: vec![0; 3] })).unwrap();
    let e = h.handle.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("step 7"), "{e}");
    assert_eq!(probe(&run.path().join("progress.mp4")).unwrap().frames, 1);
}

#[cfg(feature = "video")]
#[test]
fn no_frames_no_file_and_probe_errors_name_the_file() {
    let run = tempfile::tempdir().unwrap();
    let (path, bus) = encode(run.path(), "none.mp4", vec![], 0);
    assert!(!path.exists());
    assert!(bus.iter().any(|m| matches!(m, BusMessage::Warning { msg, .. } if msg.contains("no frames"))));
    let e = probe(&path).unwrap_err().to_string();
    assert!(e.contains("none.mp4"), "{e}");
    let junk = run.path().join("junk.mp4");
    std::fs::write(&junk, b"not a video at all").unwrap();
    assert!(probe(&junk).unwrap_err().to_string().contains("junk.mp4"));
    assert!(decode_frame(&junk, 0).unwrap_err().to_string().contains("junk.mp4"));
}

#[cfg(feature = "video")]
#[test]
fn dropping_a_writer_finalises_it() {
    // The drop guard (what runs if the stage thread panics).
    let run = tempfile::tempdir().unwrap();
    let path = run.path().join("p.mp4");
    let partial = partial_path(&path);
    let first = quadrants(1, 32, 32, 0);
    let mut w = enc::Mp4Writer::create(&partial, &path, &VideoConfig::default(), &first).unwrap();
    w.push(&first).unwrap();
    w.push(&quadrants(2, 32, 32, 1)).unwrap();
    drop(w);
    assert_eq!(probe(&path).unwrap().frames, 2);
    assert!(!partial.exists());
}
