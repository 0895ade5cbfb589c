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

/// Compile stages/csrc/shim.cpp (ATen calls tch lacks) into a static library of pipe-stages.
fn build_shim() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    let Some(inc) = torch_include_dir() else {
        panic!("libtorch's headers not found (torch/include of the pip torch): run scripts/setup.sh");
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .opt_level(2)
        .compile("pipe_shim");
}

fn main() {
    // The same script serves the `pipe` binary crate (link arguments only) and pipe-stages,
    // which also holds the C++ shim.
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("pipe-stages") {
        build_shim();
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
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
