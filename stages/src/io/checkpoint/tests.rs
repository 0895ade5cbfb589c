//! Tests of the parent module.

use super::*;
use tch::Device;

fn manifest(step: u64) -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        step,
        images: step * 4,
        elapsed_s: 1.5,
        seed: 7,
        data: DataPosition { next_index: step, epoch: 1, pos: 12 },
        g_adam_steps: step,
        d_adam_steps: step,
        image: [1, 4, 4],
        latent: 3,
        ema: false,
        pipeline: "Pipeline(name: \"t\")".into(),
        crc32: 0,
        pipe_version: "test".into(),
        last: false,
        losses: None,
    }
}

fn tensors() -> Vec<(String, Tensor)> {
    vec![("g.w".into(), Tensor::from_slice(&[1.0f32, -2.5, 3.25, 0.0]).view([2, 2])), ("d.b".into(), Tensor::from_slice(&[0.5f32]))]
}

#[test]
fn round_trip_keeps_values_manifest_and_prunes() {
    let dir = tempfile::tempdir().unwrap();
    for step in [10, 20, 30] {
        write(dir.path(), manifest(step), &tensors(), 2).unwrap();
    }
    let steps: Vec<u64> = list(dir.path()).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![20, 30], "only the newest 2 are kept");
    let c = read(&dir.path().join(file_name(30))).unwrap();
    let mut want = manifest(30);
    want.crc32 = c.manifest.crc32;
    assert_eq!(c.manifest, want);
    assert_ne!(c.manifest.crc32, 0);
    assert_eq!(c.tensors["g.w"].size(), vec![2, 2]);
    assert_eq!(Vec::<f32>::try_from(c.tensors["g.w"].view([-1])).unwrap(), vec![1.0, -2.5, 3.25, 0.0]);
    // No partial file is left behind.
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("partial")));
}

#[test]
fn the_newest_keep_checkpoints_stay_whatever_their_schedule_and_stale_partials_go() {
    let dir = tempfile::tempdir().unwrap();
    let steps = |d: &Path| list(d).iter().map(|(s, _)| *s).collect::<Vec<_>>();
    // keep 2: a run checkpointing every 10 stopped at 23 (off schedule), resumed, went on to 40.
    for step in [10, 20, 23] {
        write(dir.path(), manifest(step), &tensors(), 2).unwrap();
    }
    assert_eq!(steps(dir.path()), vec![20, 23], "the newest two, one off schedule");
    // A temporary file left by a process killed while writing step 30 (see crate::io::atomic).
    std::fs::write(dir.path().join(format!(".{}.k1lld0.partial", file_name(30))), b"killed mid-write").unwrap();
    write(dir.path(), manifest(30), &tensors(), 2).unwrap();
    assert_eq!(steps(dir.path()), vec![23, 30]);
    write(dir.path(), manifest(40), &tensors(), 2).unwrap();
    assert_eq!(steps(dir.path()), vec![30, 40]);
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".partial")));

    // keep 3: checkpoints every 5 up to 15, then a resume with the pipeline file's schedule
    // (every 1000, say) ends at 18: only the oldest goes, none for being off that schedule.
    let dir = tempfile::tempdir().unwrap();
    for step in [5, 10, 15, 18] {
        write(dir.path(), manifest(step), &tensors(), 3).unwrap();
    }
    assert_eq!(steps(dir.path()), vec![10, 15, 18]);

    // Files named like checkpoints but not as pipe names them are the user's: never listed,
    // never pruned.
    for name in ["step_7.safetensors", "step_+0000009.safetensors", "step_00000001.safetensors.bak"] {
        std::fs::write(dir.path().join(name), b"mine").unwrap();
    }
    write(dir.path(), manifest(20), &tensors(), 3).unwrap();
    assert_eq!(steps(dir.path()), vec![15, 18, 20]);
    for name in ["step_7.safetensors", "step_+0000009.safetensors", "step_00000001.safetensors.bak"] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    assert_eq!(step_of("step_123456789.safetensors"), Some(123_456_789), "more than 8 digits once past 10⁸");
}

#[test]
fn truncated_corrupt_and_foreign_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), manifest(5), &tensors(), 3).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Truncated.
    let cut = dir.path().join(file_name(6));
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let e = read(&cut).unwrap_err().to_string();
    assert!(e.contains("step_00000006.safetensors: not a readable checkpoint: the file is truncated or corrupt"), "{e}");
    // One flipped bit in the data.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let bad = dir.path().join(file_name(7));
    std::fs::write(&bad, &flipped).unwrap();
    let e = read(&bad).unwrap_err().to_string();
    assert!(e.ends_with("corrupt checkpoint: the tensor data does not match its checksum"), "{e}");
    // Empty and garbage.
    std::fs::write(dir.path().join(file_name(8)), b"").unwrap();
    assert!(read(&dir.path().join(file_name(8))).unwrap_err().to_string().contains("truncated or corrupt"));
    // A safetensors file without a manifest.
    let plain = safetensors::serialize(
        vec![("x", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap())],
        None,
    )
    .unwrap();
    std::fs::write(dir.path().join(file_name(9)), plain).unwrap();
    assert!(read(&dir.path().join(file_name(9))).unwrap_err().to_string().contains("not a pipe checkpoint"));
    // latest() falls back past the damaged newer files to step 5, saying why.
    let (c, skipped) = latest(dir.path()).unwrap();
    assert_eq!(c.manifest.step, 5);
    assert_eq!(skipped.len(), 4);
    // Nothing readable at all.
    std::fs::remove_file(&path).unwrap();
    assert!(latest(dir.path()).unwrap_err().to_string().contains("no readable checkpoint"));
    assert!(latest(&dir.path().join("nope")).unwrap_err().to_string().contains("no checkpoints"));
}

#[test]
fn non_finite_weights_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), manifest(1), &tensors(), 3).unwrap();
    let mut t = tensors();
    t[0].1 = Tensor::from_slice(&[1.0f32, f32::NAN, 0.0, 0.0]).view([2, 2]);
    let e = write(dir.path(), manifest(2), &t, 3).unwrap_err().to_string();
    assert!(e.contains("step 2: tensor `g.w` holds NaN or infinite values"), "{e}");
    assert_eq!(list(dir.path()).len(), 1);
    assert_eq!(latest(dir.path()).unwrap().0.manifest.step, 1);
}

#[test]
fn a_failed_write_leaves_the_earlier_checkpoints_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let first = write(dir.path(), manifest(1), &tensors(), 3).unwrap();
    let before = std::fs::read(&first).unwrap();
    // The checkpoint of step 2 cannot be put in place (a folder is in its way).
    std::fs::create_dir_all(dir.path().join(file_name(2)).join("x")).unwrap();
    let e = write(dir.path(), manifest(2), &tensors(), 1).unwrap_err().to_string();
    assert!(e.contains("step_00000002.safetensors: cannot write the checkpoint"), "{e}");
    assert!(e.contains("the earlier checkpoints are kept"), "{e}");
    // Nothing was pruned (keep: 1 would have removed step 1 after a good write), and the
    // temporary file is gone.
    assert_eq!(std::fs::read(&first).unwrap(), before);
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".partial")));
    assert_eq!(latest(dir.path()).unwrap().0.manifest.step, 1);
}

#[test]
fn an_unwritable_folder_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let e = write(&blocker.join("sub"), manifest(1), &tensors(), 3).unwrap_err().to_string();
    assert!(e.contains("cannot create the checkpoint folder"), "{e}");
}

#[test]
fn loading_into_a_different_model_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(vs.root() / "l", 3, 2, Default::default());
    let saved = host_vars(&vs, "g.").unwrap();
    write(dir.path(), manifest(1), &saved, 3).unwrap();
    let c = read(&dir.path().join(file_name(1))).unwrap();
    // Same model: values copied in place.
    let other = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(other.root() / "l", 3, 2, Default::default());
    c.load_vars("g.", &other).unwrap();
    assert!(other.variables()["l.weight"].equal(&vs.variables()["l.weight"]));
    // Wider model: the tensor and both shapes are named.
    let wide = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(wide.root() / "l", 3, 5, Default::default());
    let e = c.load_vars("g.", &wide).unwrap_err().to_string();
    assert!(e.contains("written for a different model"), "{e}");
    assert!(e.contains("tensor `g.l.weight`: the checkpoint has shape [2, 3], this pipeline's model has [5, 3]"), "{e}");
    assert!(e.contains("tensor `g.l.bias`: the checkpoint has shape [2], this pipeline's model has [5]"), "{e}");
    // Another layer name: missing and extra.
    let renamed = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(renamed.root() / "k", 3, 2, Default::default());
    let e = c.load_vars("g.", &renamed).unwrap_err().to_string();
    assert!(e.contains("tensor `g.k.weight` is missing from the checkpoint"), "{e}");
    assert!(e.contains("tensor `g.l.weight` of the checkpoint has no place in this pipeline's model"), "{e}");
}

#[test]
fn step_seeds_differ_by_step_update_and_seed() {
    let a = step_seed(0, 1, 0);
    assert_eq!(a, step_seed(0, 1, 0));
    assert!(a >= 0);
    let all = [step_seed(0, 2, 0), step_seed(0, 1, 1), step_seed(1, 1, 0), step_seed(0, 1, u32::MAX)];
    assert!(all.iter().all(|&s| s != a && s >= 0));
}
