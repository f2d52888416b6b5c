#!/usr/bin/env bash
# Runs the test suite on the CPU under the GPU machine's Python and jax
# (Python 3.12, jax 0.11.2; the CI machine has 3.11 and jax 0.10.x), so that
# a jax API change is caught without waiting for a GPU session. Needs a
# Python 3.12 interpreter (pyenv's, or $PY312) and PyPI.
# Usage: tools/test_gpu_machine_jax.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}
[ -x "$py" ] || { echo "no Python 3.12 found (set PY312)" >&2; exit 2; }
venv=${VENV312:-/tmp/approx_jax_venv312}
jax_version=${JAX_VERSION:-0.11.2}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
# Builds the extension for this Python (against jaxlib 0.10.2's headers, as in
# CI) and installs the package with the GPU machine's jax.
"$venv/bin/python" -m pip install -q ".[test]" "jax==$jax_version" "jaxlib==$jax_version"
"$venv/bin/python" -c "import jax; print('jax', jax.__version__)"
# From outside the checkout, so the installed package (with its modules) is tested.
cd /tmp && "$venv/bin/python" -m pytest "$OLDPWD/tests" -q -p no:cacheprovider "$@"
