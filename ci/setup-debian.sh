#!/bin/sh
# The old name of ci/setup.sh, which now sets up Debian 12 and Ubuntu alike; kept so that
# scripts and notes written for it go on working.
set -eu
exec sh "$(dirname "$0")/setup.sh" "$@"
