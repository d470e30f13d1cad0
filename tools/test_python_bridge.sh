#!/usr/bin/env bash
# Builds galore's PyTorch bridge (python/) into a build folder and runs its tests
# (tests/python). CTest runs it as test_python_bridge.
#   tools/test_python_bridge.sh [python3] [build folder]
# Exits 77 (CTest: skipped) when that python cannot import torch or find the
# pybind11 headers (Debian: apt-get install python3-torch pybind11-dev).
# GALORE_TORCH_REFERENCE: a folder holding galore_torch 1.0 (its wheel
# unpacked), for the comparison against the reference; skipped without it.
set -euo pipefail
py=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${2:-$root/build/python}" && cd "${2:-$root/build/python}" && pwd)
# A python without torch (a pyenv or venv one first on PATH, say) gives way to
# the system's, where Debian's python3-torch lives.
if ! "$py" -c "import torch" 2>/dev/null && [ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import torch" 2>/dev/null; then
  py=/usr/bin/python3
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "skipped: $py cannot import torch (Debian: apt-get install python3-torch pybind11-dev)"
  exit 77
fi
echo "python: $py, torch $("$py" -c 'import torch; print(torch.__version__)')"
if ! "$py" - <<'PY'
import os, sys
from torch.utils import cpp_extension
dirs = cpp_extension.include_paths() + ["/usr/include", "/usr/local/include"]
sys.exit(0 if any(os.path.exists(os.path.join(d, "pybind11", "pybind11.h")) for d in dirs) else 1)
PY
then
  echo "skipped: no pybind11 headers for $py's torch (Debian: apt-get install pybind11-dev)"
  exit 77
fi
(cd "$root/python" && "$py" setup.py -q build --build-base "$out/build" --build-lib "$out/lib")
export PYTHONPATH="$out/lib${GALORE_TORCH_REFERENCE:+:$GALORE_TORCH_REFERENCE}"
"$py" -m unittest discover -s "$root/tests/python" -v
