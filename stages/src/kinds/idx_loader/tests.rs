//! Tests of the parent module.

use super::*;
use crate::data::batches::test_util::{assert_resumes_exactly, run_stage, run_stage_taking};
use std::io::Write;

/// IDX image bytes for `n` images of `h`×`w`; pixel (i, k) = (i·16 + k) mod 256.
fn idx_bytes(n: u32, h: u32, w: u32) -> Vec<u8> {
    let mut v = IMAGES_MAGIC.to_be_bytes().to_vec();
    for d in [n, h, w] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    for i in 0..n as usize {
        for k in 0..(h * w) as usize {
            v.push(((i * 16 + k) % 256) as u8);
        }
    }
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn cfg(root: &Path, batch: usize) -> IdxLoaderConfig {
    IdxLoaderConfig { root: root.to_path_buf(), batch, epochs: Some(1), shuffle: false, ..Default::default() }
}

#[test]
fn plain_file_first_batch_values() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 4, 4));
    let loader = build(&cfg(dir.path(), 4), 1, None, DataPosition::default()).unwrap();
    assert_eq!(loader.image_shape(), [1, 4, 4]);
    assert_eq!(loader.len(), 10);
    let out = run_stage(Box::new(loader));
    out.result.unwrap();
    // drop_last: 10 images → 2 full batches of 4.
    assert_eq!(out.batches.len(), 2);
    let b = &out.batches[0];
    assert_eq!((b.index, b.epoch, b.shape), (0, 0, [4, 1, 4, 4]));
    assert!(b.x_hat.is_none());
    for (j, &v) in b.x.iter().enumerate() {
        let (i, k) = (j / 16, j % 16);
        let p = ((i * 16 + k) % 256) as f32;
        assert_eq!(v, p / 127.5 - 1.0);
    }
    assert_eq!(out.batches[1].index, 1);
    assert_eq!(out.batches[1].x[0], 64.0 / 127.5 - 1.0);
}

#[test]
fn gz_file_and_dotted_name_and_test_split() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "t10k-images.idx3-ubyte.gz", &gz(&idx_bytes(10, 4, 4)));
    let mut c = cfg(dir.path(), 3);
    c.split = Split::Test;
    c.drop_last = false;
    let loader = build(&c, 1, None, DataPosition::default()).unwrap();
    assert!(loader.path().ends_with("t10k-images.idx3-ubyte.gz"));
    let out = run_stage(Box::new(loader));
    out.result.unwrap();
    let sizes: Vec<usize> = out.batches.iter().map(|b| b.shape[0]).collect();
    assert_eq!(sizes, vec![3, 3, 3, 1]);
    assert_eq!(out.batches[3].x[0], (9.0 * 16.0 % 256.0) / 127.5 - 1.0);
    // The Train split is not there.
    let e = build(&cfg(dir.path(), 3), 1, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("looked for"), "{e}");
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = idx_bytes(10, 4, 4);
    bytes.truncate(bytes.len() - 5);
    let p = write(dir.path(), "train-images-idx3-ubyte", &bytes);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    assert!(e.contains("declares 10 images of 4×4 = 160 bytes but has 155"), "{e}");
    // Also through gzip.
    std::fs::remove_file(&p).unwrap();
    write(dir.path(), "train-images-idx3-ubyte.gz", &gz(&bytes));
    let e = build(&cfg(dir.path(), 2), 1, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte.gz") && e.contains("declares"), "{e}");
}

#[test]
fn padding_adds_a_background_border() {
    let img = IdxImages { n: 2, h: 2, w: 3, pixels: (1..=12).collect() };
    let p = pad_images(img, 1);
    assert_eq!((p.n, p.h, p.w), (2, 4, 5));
    #[rustfmt::skip]
    let want0: Vec<u8> = vec![
        0, 0, 0, 0, 0,
        0, 1, 2, 3, 0,
        0, 4, 5, 6, 0,
        0, 0, 0, 0, 0,
    ];
    assert_eq!(p.image(0), want0.as_slice());
    assert_eq!(&p.image(1)[6..9], &[7, 8, 9]);
    // Through the loader: 28×28 → 32×32, shape reported before reading the data too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), idx_bytes(4, 28, 28)).unwrap();
    let c = IdxLoaderConfig { root: dir.path().into(), batch: 2, pad: 2, ..Default::default() };
    assert_eq!(probe_shape(&c).unwrap().0, [1, 32, 32]);
    let l = build(&c, 0, Some(1), DataPosition::default()).unwrap();
    assert_eq!(l.image_shape(), [1, 32, 32]);
    let e = build(&IdxLoaderConfig { pad: 65, ..c }, 0, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.contains("`pad` is 65, expected 0 to 64"), "{e}");
}

#[test]
fn wrong_magic_and_dtype_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = idx_bytes(2, 2, 2);
    bytes[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    let p = write(dir.path(), "a", &bytes);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("expected magic 0x00000803, found 0x12345678"), "{e}");
    // A label file where images are expected.
    bytes[0..4].copy_from_slice(&LABELS_MAGIC.to_be_bytes());
    let p = write(dir.path(), "b", &bytes);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("found 0x00000801"), "{e}");
    // f32 data.
    bytes[0..4].copy_from_slice(&0x0000_0D03u32.to_be_bytes());
    let p = write(dir.path(), "c", &bytes);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("unsupported IDX data type 0x0D"), "{e}");
    // Empty file.
    let p = write(dir.path(), "d", &[]);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn corrupt_gzip_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = gz(&idx_bytes(10, 4, 4));
    let n = bytes.len();
    for b in &mut bytes[12..n - 8] {
        *b ^= 0x5A;
    }
    let p = write(dir.path(), "train-images-idx3-ubyte.gz", &bytes);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");
    assert!(e.contains("corrupt or truncated gzip data"), "{e}");
    // A gzip stream cut short.
    let good = gz(&idx_bytes(10, 4, 4));
    let p = write(dir.path(), "cut.gz", &good[..good.len() / 2]);
    let e = read_idx_images(&p).unwrap_err().to_string();
    assert!(e.contains("cut.gz") && e.contains("gzip"), "{e}");
}

#[test]
fn labels_reader() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = LABELS_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&3u32.to_be_bytes());
    v.extend_from_slice(&[7, 2, 1]);
    let p = write(dir.path(), "l.gz", &gz(&v));
    let l = read_idx_labels(&p).unwrap();
    assert_eq!(l, IdxLabels { n: 3, labels: vec![7, 2, 1] });
    v.pop();
    let p = write(dir.path(), "l2", &v);
    let e = read_idx_labels(&p).unwrap_err().to_string();
    assert!(e.contains("declares 3 labels but has 2"), "{e}");
}

#[test]
fn missing_folder_and_too_few_images() {
    let dir = tempfile::tempdir().unwrap();
    let e = build(&cfg(&dir.path().join("nope"), 4), 1, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("no such folder"), "{e}");
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(3, 2, 2));
    let e = build(&cfg(dir.path(), 4), 1, None, DataPosition::default()).unwrap_err().to_string();
    assert!(e.contains("only 3 images"), "{e}");
}

#[test]
fn shuffle_is_seeded_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(16, 1, 1));
    let c = IdxLoaderConfig { epochs: Some(2), shuffle: true, ..cfg(dir.path(), 16) };
    let run = |seed| run_stage(Box::new(build(&c, seed, None, DataPosition::default()).unwrap()));
    let a = run(42);
    let b = run(42);
    a.result.unwrap();
    assert_eq!(a.batches.len(), 2);
    assert_eq!(a.batches, b.batches);
    assert_eq!((a.batches[1].index, a.batches[1].epoch), (1, 1));
    assert_ne!(a.batches[0].x, a.batches[1].x, "epochs should differ in order");
    let c2 = run(43);
    assert_ne!(a.batches[0].x, c2.batches[0].x);
    // Every image exactly once per epoch.
    let mut firsts: Vec<u8> = a.batches[0].x.iter().map(|&v| ((v + 1.0) * 127.5).round() as u8).collect();
    firsts.sort_unstable();
    assert_eq!(firsts, (0..16).map(|i| (i * 16 % 256) as u8).collect::<Vec<_>>());
}

#[test]
fn stops_at_max_batches_and_when_outputs_close() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
    let c = IdxLoaderConfig { epochs: None, ..cfg(dir.path(), 2) };
    let out = run_stage(Box::new(build(&c, 0, Some(12), DataPosition::default()).unwrap()));
    out.result.unwrap();
    assert_eq!(out.batches.len(), 12);
    assert_eq!(out.batches[11].epoch, 2);
    // Endless, downstream goes away after 3 batches: the loader ends cleanly.
    let out = run_stage_taking(Box::new(build(&c, 0, None, DataPosition::default()).unwrap()), 3);
    out.result.unwrap();
    assert_eq!(out.batches.len(), 3);
}

#[test]
fn resuming_after_any_batch_gives_the_rest_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // 10 distinct images; batch 3 leaves 1 over per epoch, batch 5 ends epochs exactly.
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
    for (batch, drop_last) in [(3, true), (3, false), (5, true)] {
        let c = IdxLoaderConfig { epochs: Some(3), shuffle: true, drop_last, ..cfg(dir.path(), batch) };
        let run_from = |start| run_stage(Box::new(build(&c, 7, None, start).unwrap()));
        let full = run_from(DataPosition::default());
        full.result.unwrap();
        let next_pos: Vec<u64> = full.batches.iter().take(4).map(|b| b.next_pos).collect();
        let expected: &[u64] = match (batch, drop_last) {
            (3, true) => &[3, 6, 9, 3],
            (3, false) => &[3, 6, 9, 10],
            _ => &[5, 10, 5, 10],
        };
        assert_eq!(next_pos, expected, "batch {batch}, drop_last {drop_last}");
        let ends = assert_resumes_exactly(&full.batches, 10, run_from);
        assert_eq!(ends > 0, !(batch == 3 && drop_last), "batch {batch}, drop_last {drop_last}: {ends} epoch ends");
    }
    // A position at the very end of an epoch the run never stopped at (drop_last drops the
    // 10th image): the next epoch starts.
    let c = IdxLoaderConfig { epochs: Some(3), shuffle: true, ..cfg(dir.path(), 3) };
    let full = run_stage(Box::new(build(&c, 7, None, DataPosition::default()).unwrap())).batches;
    let out = run_stage(Box::new(build(&c, 7, None, DataPosition { next_index: 3, epoch: 0, pos: 10 }).unwrap()));
    out.result.unwrap();
    assert_eq!(out.batches, full[3..]);
}

#[test]
fn resuming_keeps_max_batches_and_epochs_absolute() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
    let c = IdxLoaderConfig { epochs: None, drop_last: false, ..cfg(dir.path(), 3) };
    let full = run_stage(Box::new(build(&c, 1, Some(8), DataPosition::default()).unwrap())).batches;
    assert_eq!(full.len(), 8);
    let start = full[4].position_after();
    assert_eq!(start, DataPosition { next_index: 5, epoch: 1, pos: 3 });
    let out = run_stage(Box::new(build(&c, 1, Some(8), start).unwrap()));
    out.result.unwrap();
    assert_eq!(out.batches.iter().map(|b| b.index).collect::<Vec<_>>(), vec![5, 6, 7]);
    assert_eq!(out.batches, full[5..]);
    // At or past either limit: nothing more, and no error.
    let out = run_stage(Box::new(build(&c, 1, Some(8), DataPosition { next_index: 8, ..start }).unwrap()));
    assert!(out.result.is_ok() && out.batches.is_empty());
    let c2 = IdxLoaderConfig { epochs: Some(2), ..c.clone() };
    let out = run_stage(Box::new(build(&c2, 1, None, DataPosition { next_index: 8, epoch: 2, pos: 0 }).unwrap()));
    assert!(out.result.is_ok() && out.batches.is_empty());
    let out = run_stage(Box::new(build(&c2, 1, None, DataPosition { next_index: 8, epoch: 1, pos: 10 }).unwrap()));
    assert!(out.result.is_ok() && out.batches.is_empty());
}

#[test]
fn resuming_past_the_end_of_the_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
    let c = cfg(dir.path(), 3);
    let start = DataPosition { next_index: 40, epoch: 4, pos: 11 };
    let e = build(&c, 1, None, start).unwrap_err().to_string();
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    assert!(
        e.contains("cannot resume at image 11 of epoch 4: the data has only 10 images (was it changed since the checkpoint?)"),
        "{e}"
    );
}

#[test]
fn config_defaults_and_unknown_fields() {
    let c: IdxLoaderConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, IdxLoaderConfig::default());
    assert_eq!((c.batch, c.epochs, c.drop_last, c.shuffle), (64, None, true, true));
    assert!(serde_json::from_str::<IdxLoaderConfig>(r#"{"bogus": 1}"#).is_err());
    let c: IdxLoaderConfig = serde_json::from_str(r#"{"split": "Test"}"#).unwrap();
    assert_eq!(c.split, Split::Test);
}

/// Manual check on the real data (run with `--ignored`).
#[test]
#[ignore]
fn real_mnist_and_fashion() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    for (name, n) in [("mnist", 10000), ("fashion-mnist", 60000)] {
        let t = std::time::Instant::now();
        let c = IdxLoaderConfig { root: data.join(name), ..Default::default() };
        let l = build(&c, 0, None, DataPosition::default()).unwrap();
        assert_eq!((l.len(), l.image_shape()), (n, [1, 28, 28]));
        eprintln!("{name}: {} images read in {:?}", l.len(), t.elapsed());
    }
}

#[test]
fn ranks_take_disjoint_slices_of_the_single_process_batches() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train-images-idx3-ubyte", &idx_bytes(10, 2, 2));
    // Global batch 4 over 10 images, shuffled, 2 epochs: 3 batches per epoch, the last short (2).
    let c = IdxLoaderConfig { root: dir.path().to_path_buf(), batch: 4, epochs: Some(2), shuffle: true, drop_last: false, ..Default::default() };
    let run = |rank, world| {
        let mut l = build(&c, 7, None, DataPosition::default()).unwrap();
        l.shard = crate::data::batches::Shard { rank, world };
        run_stage(Box::new(l)).batches
    };
    let single = run(0, 1);
    let (r0, r1) = (run(0, 2), run(1, 2));
    assert_eq!(single.len(), 6);
    // Short batches (2 images) split evenly over 2 ranks too: each rank gets 1.
    assert_eq!(r0.len(), 6);
    for ((s, a), b) in single.iter().zip(&r0).zip(&r1) {
        assert_eq!((a.index, a.epoch, a.next_pos), (s.index, s.epoch, s.next_pos));
        assert_eq!((b.index, b.epoch, b.next_pos), (s.index, s.epoch, s.next_pos));
        assert_eq!(a.shape[0] + b.shape[0], s.shape[0]);
        let joined: Vec<f32> = a.x.iter().chain(&b.x).copied().collect();
        assert_eq!(joined, s.x, "batch {}: rank 0's then rank 1's images are the single batch", s.index);
    }
    // Global batch 6 over 3 ranks: the short batch of each epoch (4 images) cannot be split,
    // so every rank skips it alike; the full ones give 2 images per rank.
    let c6 = IdxLoaderConfig { batch: 6, ..c.clone() };
    let thirds: Vec<Vec<_>> = (0..3)
        .map(|rank| {
            let mut l = build(&c6, 7, None, DataPosition::default()).unwrap();
            l.shard = crate::data::batches::Shard { rank, world: 3 };
            run_stage(Box::new(l)).batches
        })
        .collect();
    for t in &thirds {
        assert_eq!(t.iter().map(|b| (b.epoch, b.shape[0])).collect::<Vec<_>>(), vec![(0, 2), (1, 2)]);
    }
    assert_eq!(crate::data::batches::Shard { rank: 0, world: 3 }.batch_problem(6), None);
    assert!(crate::data::batches::Shard { rank: 0, world: 3 }.batch_problem(4).unwrap().contains("multiple of the world size"));
}
