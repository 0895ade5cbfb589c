#!/usr/bin/env bash
# Set up on first use (see setup.sh), then run the whole test suite (CPU only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# shellcheck source=env.sh
source "$root/scripts/env.sh"
cd "$root"
# The fault-injection hooks (a cargo feature) are built in for the tests only; the binary
# scripts/setup.sh builds for use has none. The test build puts its own `pipe` (with hooks) at
# target/release/pipe, so put the plain one back however the tests end (cargo keeps both
# builds, so this only copies it back).
restore() { cargo build --release --quiet ${PIPE_FEATURES:+--features "$PIPE_FEATURES"} || echo "warning: could not rebuild the plain target/release/pipe: run cargo build --release" >&2; }
trap restore EXIT
cargo test --release --workspace --features pipe/fault-injection "$@"
