//! Print what a run's progress.mp4 holds and save one of its frames as a PNG, decoding it with
//! the same FFmpeg code `pipe`'s tests use.
//!
//! ```sh
//! cargo run --release --example video_frame -- runs/irasutoya_small/progress.mp4 -1 frame.png
//! ```
//! The frame index counts from 0; -1 is the last frame.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, video, index, out] = args.as_slice() else {
        return Err("usage: video_frame VIDEO.mp4 INDEX OUT.png".into());
    };
    let path = std::path::Path::new(video);
    let info = pipe_stages::kinds::video::probe(path)?;
    println!("{video}: {} frames of {}×{}, codec {}", info.frames, info.width, info.height, info.codec);
    let i: i64 = index.parse()?;
    let i = if i < 0 { info.frames as i64 + i } else { i };
    let frame = pipe_stages::kinds::video::decode_frame(path, i as u64)?;
    image::RgbImage::from_raw(frame.width, frame.height, frame.rgb).ok_or("bad frame size")?.save(out)?;
    println!("frame {i} → {out}");
    Ok(())
}
