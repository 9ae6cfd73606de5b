#!/usr/bin/env bash
# System packages the project needs: a Java runtime for the TextWorldExpress and ScienceWorld engines.
set -euo pipefail
if ! command -v java >/dev/null 2>&1; then
  echo "Installing a Java runtime (TextWorldExpress runs on the JVM)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless
fi
