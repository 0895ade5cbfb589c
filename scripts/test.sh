#!/usr/bin/env bash
# Set up on first use (see setup.sh), then run the whole test suite (CPU only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# shellcheck source=env.sh
source "$root/scripts/env.sh"
cd "$root"
cargo test --release --workspace "$@"
