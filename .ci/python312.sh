# Shared by the CI scripts: `source .ci/python312.sh` sets PY to a working
# Python 3.12 or exits with a message saying how to get one.
# A working Python 3.12: `python3.12` on PATH (a pyenv shim only counts if it
# runs), else pyenv's 3.12 installs.
find_python312() {
  local candidates=(python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.12.*/bin/python3.12)
  fi
  local py
  for py in "${candidates[@]}"; do
    if "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}
if ! PY=$(find_python312); then
  echo "$0: no Python 3.12 found (no working python3.12 on PATH," \
    "none under \$(pyenv root)/versions/3.12.*); install Python 3.12" \
    "(e.g. 'pyenv install 3.12') and run again." >&2
  exit 1
fi

