# Sourced by scripts/serve and scripts/test: make .venv (Python 3.12+) and
# install a requirements file into it, again whenever that file changes.
# Usage: ensure_venv <requirements file>

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local candidates=(python3.13 python3.12 python3)
    local c
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    # pyenv installs that are not the active version (its shims refuse them).
    for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
        if [ -x "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

ensure_venv() {
    local requirements="$1"
    local name="${requirements#"$ROOT"/}"
    local stamp="$VENV/.installed-${name//\//_}"
    local wanted
    wanted="$(cat "$ROOT/requirements.txt" "$requirements" | sha256sum | cut -d' ' -f1)"
    if [ ! -x "$VENV/bin/python" ]; then
        local python
        python="$(find_python)" || { echo "registry-cache needs Python 3.12 or newer (mitmproxy 12); none found" >&2; exit 1; }
        echo "creating $VENV with $python" >&2
        "$python" -m venv "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        echo "installing $requirements into $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$wanted" > "$stamp"
    fi
}
