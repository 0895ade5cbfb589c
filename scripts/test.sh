#!/usr/bin/env bash
# Set up on first use (see setup.sh), then run the whole test suite (CPU only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# shellcheck source=env.sh
source "$root/scripts/env.sh"
cd "$root"
# The fault-injection hooks (a cargo feature) are built in for the tests only; the binary
# scripts/setup.sh builds for use has none.
cargo test --release --workspace --features pipe/fault-injection "$@"
