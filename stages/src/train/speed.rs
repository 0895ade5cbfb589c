//! How the step stages use the device: eager kernels or a replayed CUDA graph, f32 or bf16,
//! contiguous or channels_last tensors. The pipeline sets them (`execution`, `precision`,
//! `memory_format`, next to `device`); `Auto` picks the fastest setting that is correct on the
//! device the run trains on ([`SpeedSettings::resolve`]).

use crate::core::problem::Problem;
use serde::{Deserialize, Serialize};

/// How each training step is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Execution {
    /// Graph on a CUDA device when the step can be captured (Adam with `fused`, or RMSProp;
    /// `on_nonfinite: Stop`), else Eager. On the CPU: Eager.
    #[default]
    Auto,
    /// Every operation launched from the host as it comes (PyTorch's default).
    Eager,
    /// The whole D update and the whole G update each captured once as a CUDA graph and
    /// replayed every step (CUDA only; needs a capturable step: see `Auto`).
    Graph,
}

/// Arithmetic of the forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Precision {
    /// Bf16 on a CUDA device that computes in bfloat16 (compute capability 8.0 and up), else
    /// Fp32. On the CPU: Fp32.
    #[default]
    Auto,
    /// Everything in 32-bit floats.
    Fp32,
    /// Matrix products and convolutions of the forward passes in bfloat16 under autocast
    /// (PyTorch's `torch.autocast(dtype=torch.bfloat16)`); weights, optimiser state, losses
    /// and the penalty's norm stay f32 (CUDA only).
    Bf16,
}

/// Memory layout of images, feature maps and convolution weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum MemoryFormat {
    /// ChannelsLast for convolutional models on a CUDA device, else Contiguous.
    #[default]
    Auto,
    /// NCHW, PyTorch's default.
    Contiguous,
    /// NHWC strides (PyTorch's `channels_last`), which cuDNN's tensor-core convolutions prefer.
    ChannelsLast,
}

/// The three settings as the pipeline gives them (each may be `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpeedSettings {
    pub execution: Execution,
    pub precision: Precision,
    pub memory_format: MemoryFormat,
}

/// What the device and the pipeline allow, for resolving `Auto` and refusing the impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeedContext {
    /// The run trains on a CUDA device.
    pub cuda: bool,
    /// That device computes in bfloat16 (compute capability ≥ 8.0).
    pub bf16_capable: bool,
    /// This build has the CUDA part of the shim ([`crate::train::cuda::built_with_cuda`]).
    pub graphs_built: bool,
    /// Both step stages' updates can be captured (their optimisers and `on_nonfinite`); None
    /// when they can, else the reason (for the message).
    pub not_capturable: Option<&'static str>,
    /// Either network is convolutional (channels_last can help).
    pub convolutional: bool,
}

/// The settings with `Auto` resolved: what the step stages do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Speed {
    /// Capture each update as a CUDA graph.
    pub graph: bool,
    /// `graph` came from `Auto`: if the capture fails, warn and go on eagerly instead of
    /// stopping the run.
    pub graph_fallback: bool,
    /// Forward passes under bf16 autocast.
    pub bf16: bool,
    /// Images and 4-D weights channels_last.
    pub channels_last: bool,
}

impl SpeedSettings {
    /// The settings that cannot run as asked, each naming its field (`execution`,
    /// `precision`) and why.
    pub fn problems(&self, cx: &SpeedContext) -> Vec<Problem> {
        let mut v = vec![];
        if self.execution == Execution::Graph {
            if !cx.cuda {
                v.push(Problem::new(
                    "execution",
                    "execution Graph needs a CUDA device (a CUDA graph replays GPU kernels), but this run trains on the CPU: use Auto or Eager",
                ));
            } else if !cx.graphs_built {
                v.push(Problem::new("execution", format!("execution Graph: {}", crate::train::cuda::NO_CUDA_BUILD)));
            } else if let Some(why) = cx.not_capturable {
                v.push(Problem::new("execution", format!("execution Graph cannot capture this step: {why}; use Auto or Eager")));
            }
        }
        if self.precision == Precision::Bf16 {
            if !cx.cuda {
                v.push(Problem::new(
                    "precision",
                    "precision Bf16 is for CUDA devices (bf16 autocast of the forward passes); this run trains on the CPU: use Auto or Fp32",
                ));
            } else if !cx.bf16_capable {
                v.push(Problem::new(
                    "precision",
                    "precision Bf16 needs a GPU that computes in bfloat16 (compute capability 8.0 or later); this one does not: use Auto or Fp32",
                ));
            }
        }
        v
    }

    /// `Auto` resolved for the device (call after [`Self::problems`] found nothing): Graph
    /// when it can capture, Bf16 where the GPU has it, ChannelsLast for convolutional models,
    /// each on CUDA only.
    pub fn resolve(&self, cx: &SpeedContext) -> Speed {
        let can_graph = cx.cuda && cx.graphs_built && cx.not_capturable.is_none();
        Speed {
            graph_fallback: self.execution == Execution::Auto && can_graph,
            graph: match self.execution {
                Execution::Auto => can_graph,
                Execution::Eager => false,
                Execution::Graph => true,
            },
            bf16: match self.precision {
                Precision::Auto => cx.cuda && cx.bf16_capable,
                Precision::Fp32 => false,
                Precision::Bf16 => true,
            },
            channels_last: match self.memory_format {
                MemoryFormat::Auto => cx.cuda && cx.convolutional,
                MemoryFormat::Contiguous => false,
                MemoryFormat::ChannelsLast => true,
            },
        }
    }
}

impl std::fmt::Display for Speed {
    /// `eager fp32 contiguous`, `graph bf16 channels_last`, ...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            if self.graph { "graph" } else { "eager" },
            if self.bf16 { "bf16" } else { "fp32" },
            if self.channels_last { "channels_last" } else { "contiguous" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> SpeedContext {
        SpeedContext { cuda: false, bf16_capable: false, graphs_built: true, not_capturable: None, convolutional: true }
    }

    fn h200() -> SpeedContext {
        SpeedContext { cuda: true, bf16_capable: true, graphs_built: true, not_capturable: None, convolutional: true }
    }

    #[test]
    fn auto_is_eager_fp32_contiguous_on_the_cpu_and_everything_on_a_capable_gpu() {
        let auto = SpeedSettings::default();
        assert!(auto.problems(&cpu()).is_empty());
        assert_eq!(auto.resolve(&cpu()), Speed { graph: false, graph_fallback: false, bf16: false, channels_last: false });
        assert_eq!(auto.resolve(&cpu()).to_string(), "eager fp32 contiguous");
        assert_eq!(auto.resolve(&h200()), Speed { graph: true, graph_fallback: true, bf16: true, channels_last: true });
        let asked = SpeedSettings { execution: Execution::Graph, ..Default::default() };
        assert!(!asked.resolve(&h200()).graph_fallback, "an explicit Graph stops the run if it cannot capture");
        // An MLP gains nothing from channels_last; an old GPU has no bf16; Skip cannot be captured.
        let mlp = SpeedContext { convolutional: false, ..h200() };
        assert!(!auto.resolve(&mlp).channels_last);
        let old = SpeedContext { bf16_capable: false, ..h200() };
        assert!(!auto.resolve(&old).bf16);
        let skip = SpeedContext { not_capturable: Some("on_nonfinite Skip reads every loss back"), ..h200() };
        assert!(!auto.resolve(&skip).graph);
        let unbuilt = SpeedContext { graphs_built: false, ..h200() };
        assert!(!auto.resolve(&unbuilt).graph);
    }

    #[test]
    fn graph_and_bf16_are_refused_where_they_cannot_run_with_the_reason() {
        let ask = SpeedSettings { execution: Execution::Graph, precision: Precision::Bf16, memory_format: MemoryFormat::ChannelsLast };
        let p = ask.problems(&cpu());
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].field, "execution");
        assert!(p[0].msg.contains("needs a CUDA device") && p[0].msg.contains("use Auto or Eager"), "{}", p[0].msg);
        assert_eq!(p[1].field, "precision");
        assert!(p[1].msg.contains("trains on the CPU"), "{}", p[1].msg);
        assert!(ask.problems(&h200()).is_empty());
        let skip = SpeedContext { not_capturable: Some("on_nonfinite Skip reads every loss back"), ..h200() };
        let p = ask.problems(&skip);
        assert_eq!(p.len(), 1);
        assert!(p[0].msg.contains("cannot capture this step: on_nonfinite Skip"), "{}", p[0].msg);
        let old = SpeedContext { bf16_capable: false, ..h200() };
        assert!(ask.problems(&old)[0].msg.contains("compute capability 8.0"));
        let unbuilt = SpeedContext { graphs_built: false, ..h200() };
        assert!(ask.problems(&unbuilt)[0].msg.contains("without CUDA's headers"));
        // Channels_last is allowed on the CPU (libtorch supports it there too).
        let cl = SpeedSettings { memory_format: MemoryFormat::ChannelsLast, ..Default::default() };
        assert!(cl.problems(&cpu()).is_empty());
        assert!(cl.resolve(&cpu()).channels_last);
    }
}
