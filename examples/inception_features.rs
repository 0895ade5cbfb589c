//! Inception pool3 features of image files, as `pipe` computes them, saved as .npy
//! (float32 [N, 2048]) — used by scripts/check_inception.py to compare with PyTorch.
//!
//! ```sh
//! cargo run --release --example inception_features -- OUT.npy IMAGE...
//! ```
//! Images are decoded as RGB u8 at their own size (all the same size) and preprocessed by
//! `pipe_stages::quality::features::Inception`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, files) = args.split_first().ok_or("usage: inception_features OUT.npy IMAGE...")?;
    let mut data: Vec<u8> = vec![];
    let mut size = None;
    for f in files {
        let img = image::open(f)?.to_rgb8();
        let (w, h) = img.dimensions();
        if *size.get_or_insert((w, h)) != (w, h) {
            return Err(format!("{f}: {w}×{h}, the others are {:?}", size.unwrap()).into());
        }
        // HWC → CHW
        let raw = img.into_raw();
        for c in 0..3 {
            data.extend(raw.iter().skip(c).step_by(3));
        }
    }
    let (w, h) = size.ok_or("no images given")?;
    let images = tch::Tensor::from_slice(&data).view([files.len() as i64, 3, h as i64, w as i64]);
    let net = pipe_stages::quality::features::Inception::load(
        std::path::Path::new(pipe_stages::quality::features::INCEPTION_PATH),
        tch::Device::Cpu,
    )?;
    let feats = net.features(&images, 16)?;
    feats.write_npy(out)?;
    println!("{}: features {:?} of {} images", out, feats.size(), files.len());
    Ok(())
}
