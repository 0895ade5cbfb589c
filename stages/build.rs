//! Link libtorch so that `pipe` starts without LD_LIBRARY_PATH and really uses CUDA.
//!
//! - The libtorch folder (from torch-sys, i.e. the pip torch of the venv) is embedded as an rpath.
//! - `libtorch_cuda.so` is forced into the link with `--no-as-needed`: nothing references it
//!   directly, so `--as-needed` would drop it and `tch::Cuda::is_available()` would be false on a GPU.
use std::path::PathBuf;
use std::process::Command;

fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH_LIB") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out =
        Command::new(python).args(["-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.canonicalize().ok()
}

/// The pip torch's C++ headers (`torch/include`), for the shim.
fn torch_include_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("include"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args(["-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()))
}

/// CUDA's headers in the pip torch's venv (`<site-packages>/nvidia/cu13/include`), when they
/// are complete: `nv/target` (PyPI nvidia-cuda-cccl) and `crt/host_config.h` (nvidia-cuda-crt)
/// are separate packages that scripts/setup.sh installs.
fn cuda_include_dir(torch_inc: &std::path::Path) -> Option<PathBuf> {
    let site = torch_inc.parent()?.parent()?;
    let inc = site.join("nvidia/cu13/include");
    let complete = ["cuda_runtime_api.h", "nv/target", "crt/host_config.h"].iter().all(|f| inc.join(f).exists());
    complete.then_some(inc)
}

/// Compile the C++ shim (stages/csrc: ATen calls tch lacks) into static libraries of
/// pipe-stages: shim.cpp and speed.cpp against the CPU headers, and cuda.cpp with PIPE_CUDA
/// (CUDA graphs, streams) when CUDA's headers are there, else as stubs that say so.
/// Returns the folder of libcudart.so.13 when the CUDA part is built.
fn build_shim() -> Option<PathBuf> {
    for f in ["csrc/error.h", "csrc/shim.cpp", "csrc/speed.cpp", "csrc/cuda.cpp", "csrc/dist.cpp", "csrc/compat"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let Some(inc) = torch_include_dir() else {
        panic!("libtorch's headers not found (torch/include of the pip torch): run scripts/setup.sh");
    };
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&inc)
            .include(inc.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .warnings(false)
            .opt_level(2);
        b
    };
    base().file("csrc/shim.cpp").file("csrc/speed.cpp").compile("pipe_shim");
    let cuda = cuda_include_dir(&inc);
    let mut b = base();
    b.file("csrc/cuda.cpp");
    let cudart = match &cuda {
        Some(cuda_inc) => {
            b.include(cuda_inc).define("PIPE_CUDA", "1");
            let lib = cuda_inc.parent().map(|p| p.join("lib")).filter(|l| l.join("libcudart.so.13").exists());
            if lib.is_none() {
                println!("cargo:warning=CUDA headers found but not libcudart.so.13: pipe is built without CUDA graphs");
            }
            lib
        }
        None => {
            println!(
                "cargo:warning=CUDA's headers (nvidia-cuda-cccl, nvidia-cuda-crt in the venv) not found: pipe is built without CUDA graphs; scripts/setup.sh installs them"
            );
            None
        }
    };
    build_dist(&inc, cuda.as_deref().filter(|_| cudart.is_some()));
    if cuda.is_some() && cudart.is_none() {
        // Headers without the runtime: build the stubs.
        let mut b = base();
        b.file("csrc/cuda.cpp").compile("pipe_cuda");
        return None;
    }
    b.compile("pipe_cuda");
    cudart
}

/// The c10d part of the shim (csrc/dist.cpp): ProcessGroupGloo needs USE_C10D_GLOO and our gloo
/// compatibility headers (csrc/compat, first on the include path: the wheel lacks gloo's), in
/// this compile unit only. With CUDA (`cuda_inc`, headers and runtime) and the nvidia-nccl
/// wheel's nccl.h, ProcessGroupNCCL too (PIPE_DIST_NCCL).
fn build_dist(inc: &std::path::Path, cuda_inc: Option<&std::path::Path>) {
    let mut b = cc::Build::new();
    b.cpp(true)
        .include("csrc/compat")
        .include(inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", "1")
        .warnings(false)
        .opt_level(2)
        .file("csrc/dist.cpp");
    if let Some(cuda_inc) = cuda_inc {
        let nccl = cuda_inc.parent().and_then(|c| c.parent()).map(|n| n.join("nccl/include")).filter(|d| d.join("nccl.h").exists());
        match nccl {
            Some(nccl) => {
                b.include(cuda_inc).include(nccl).define("USE_C10D_NCCL", "1").define("PIPE_DIST_NCCL", "1");
            }
            None => println!("cargo:warning=nccl.h (the nvidia-nccl wheel) not found in the venv: pipe is built without NCCL"),
        }
    }
    b.compile("pipe_dist");
}

fn main() {
    // The same script serves the `pipe` binary crate (link arguments only) and pipe-stages,
    // which also holds the C++ shim.
    let stages = std::env::var("CARGO_PKG_NAME").as_deref() == Ok("pipe-stages");
    if stages {
        if let Some(cudart) = build_shim() {
            // The CUDA part of the shim calls c10_cuda and the CUDA runtime: linked for every
            // binary that uses pipe-stages, found through an rpath (or LD_LIBRARY_PATH on a
            // machine where the venv is elsewhere).
            println!("cargo:rustc-link-search=native={}", cudart.display());
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
        }
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(lib) = libtorch_lib_dir() else {
        println!("cargo:warning=libtorch not found: run scripts/setup.sh (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if let Some(cu13) = lib.parent().and_then(|t| t.parent()).map(|site| site.join("nvidia/cu13/lib")).filter(|d| d.is_dir()) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cu13.display());
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
