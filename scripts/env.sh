# Source me: the environment the build needs (libtorch from the pip torch in the venv).
# The binaries embed the libtorch path, so running `pipe` needs none of this.
_pipe_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIPE_CACHE="${PIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipe}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$PIPE_CACHE/venv/bin:$PATH"
