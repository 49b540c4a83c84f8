# Sourced by demo.sh and test.sh: makes sure ./.venv (or $ATLAS_VENV) holds atlas_jax with
# the extras asked for, installing only when the package metadata changed since the last
# install. pip's own output goes to <venv>/install.log; the console gets one line.
# Usage: ensure_venv [extra]   ("" for the base install, "test" for the test extras)

ensure_venv() {
  local extra="${1:-}"
  VENV="${ATLAS_VENV:-.venv}"
  local py="${PYTHON:-python3}"
  local stamp="$VENV/.atlas_install"
  local digest
  digest=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
  # The stamp holds "<digest> <extras installed>"; a base request is met by any install.
  if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
    local have_digest have_extra
    read -r have_digest have_extra < "$stamp" || true
    if [ "$have_digest" = "$digest" ] && { [ -z "$extra" ] || [ "$have_extra" = "$extra" ]; }; then
      return 0
    fi
  fi
  local spec="."
  [ -n "$extra" ] && spec=".[$extra]"
  echo "installing atlas_jax${extra:+ [$extra]} into $VENV (first run or changed setup.cfg; log: $VENV/install.log)"
  local t0=$SECONDS
  if [ ! -x "$VENV/bin/python" ]; then
    "$py" -m venv "$VENV"
  fi
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
         && "$VENV/bin/python" -m pip install -q -e "$spec"; } > "$VENV/install.log" 2>&1; then
    echo "pip install -e '$spec' failed; the end of $VENV/install.log:" >&2
    tail -n 30 "$VENV/install.log" >&2
    return 1
  fi
  echo "$digest $extra" > "$stamp"
  echo "installed in $((SECONDS - t0)) s"
}
