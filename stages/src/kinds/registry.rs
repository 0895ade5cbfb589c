//! The [`registry!`] macro: from one line per stage kind (in `kinds/mod.rs`), it declares the
//! kind's module and generates the closed enum `StageKind` that a pipeline file's
//! `kind: Name(...)` deserializes into (its RON syntax, and its schema from which
//! `pipe stages KIND` is written, come from the config types), with a method per
//! [`crate::kinds::Kind`] declaration that dispatches to the variant's config.

/// `/// doc` `module::Name(Config),` lines → `pub mod module;` for each, and `StageKind` with
/// a variant `Name(module::Config)` documented by the doc lines (what `pipe stages` shows).
/// Invoked once, in `kinds/mod.rs`.
#[macro_export]
macro_rules! registry {
    ($( $(#[doc = $doc:literal])* $module:ident :: $name:ident($cfgname:ident), )*) => {
        $( pub mod $module; )*
        $crate::registry!(@enum $( $(#[doc = $doc])* $name($module::$cfgname), )*);
    };
    (@enum $( $(#[doc = $doc:literal])* $name:ident($cfg:ty), )*) => {
        /// Every stage kind with its settings: `kind: Name(...)` in a pipeline file.
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub enum StageKind {
            $( $(#[doc = $doc])* $name($cfg), )*
        }

        impl StageKind {
            /// The RON names of every kind, in registry order.
            pub const NAMES: &'static [&'static str] = &[$( <$cfg as $crate::kinds::Kind>::NAME ),*];

            /// The ports of the kind named `name` (None: no such kind).
            pub fn ports_of(name: &str) -> Option<$crate::core::ports::Ports> {
                $( if name == <$cfg as $crate::kinds::Kind>::NAME { return Some(<$cfg as $crate::kinds::Kind>::PORTS); } )*
                None
            }
            /// The kind's name as written in RON.
            pub fn name(&self) -> &'static str {
                match self { $( StageKind::$name(_) => <$cfg as $crate::kinds::Kind>::NAME, )* }
            }
            /// See [`$crate::kinds::Kind::PORTS`].
            pub fn ports(&self) -> $crate::core::ports::Ports {
                match self { $( StageKind::$name(_) => <$cfg as $crate::kinds::Kind>::PORTS, )* }
            }
            /// See [`$crate::kinds::Kind::validate`].
            pub fn validate(&self, cx: &$crate::kinds::CheckContext<'_>) -> Vec<$crate::core::problem::Problem> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::validate(c, cx), )* }
            }
            /// See [`$crate::kinds::Kind::negotiate`].
            pub fn negotiate(&self, data: &$crate::kinds::DataCaps<'_>) -> Vec<$crate::core::problem::Problem> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::negotiate(c, data), )* }
            }
            /// See [`$crate::kinds::Kind::outputs`].
            pub fn outputs(&self) -> Vec<$crate::core::ports::Output<'_>> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::outputs(c), )* }
            }
            /// See [`$crate::kinds::Kind::source`].
            pub fn source(&self) -> Option<$crate::kinds::SourceInfo<'_>> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::source(c), )* }
            }
            /// See [`$crate::kinds::Kind::probe_shape`].
            pub fn probe_shape(&self) -> Option<Result<[usize; 3], $crate::core::stage::StageError>> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::probe_shape(c), )* }
            }
            /// See [`$crate::kinds::Kind::asks_images`].
            pub fn asks_images(&self) -> Option<$crate::kinds::ImageRequest> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::asks_images(c), )* }
            }
            /// See [`$crate::kinds::Kind::adds_xhat`].
            pub fn adds_xhat(&self) -> bool {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::adds_xhat(c), )* }
            }
            /// See [`$crate::kinds::Kind::watches_run`].
            pub fn watches_run(&self) -> bool {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::watches_run(c), )* }
            }
            /// See [`$crate::kinds::Kind::build`].
            pub fn build(&self, cx: &mut $crate::kinds::BuildContext<'_>) -> Result<Box<dyn $crate::core::stage::Stage>, $crate::core::stage::StageError> {
                match self { $( StageKind::$name(c) => <$cfg as $crate::kinds::Kind>::build(c, cx), )* }
            }
            /// The config, when it is of type `T` (`kind.config::<DStepConfig>()`): how the
            /// d_step ↔ g_step hand-over finds its two stages.
            pub fn config<T: 'static>(&self) -> Option<&T> {
                match self { $( StageKind::$name(c) => (c as &dyn std::any::Any).downcast_ref::<T>(), )* }
            }
            /// Mutable [`Self::config`].
            pub fn config_mut<T: 'static>(&mut self) -> Option<&mut T> {
                match self { $( StageKind::$name(c) => (c as &mut dyn std::any::Any).downcast_mut::<T>(), )* }
            }
        }
    };
}
