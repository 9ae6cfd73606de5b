#!/usr/bin/env bash
# System packages the project needs: a Java runtime for TextWorldExpress's engine, and a C/C++
# toolchain with CMake to build ALFWorld's fast-downward planner and jericho from source.
set -euo pipefail
if ! command -v java >/dev/null 2>&1; then
  echo "Installing a Java runtime (TextWorldExpress runs on the JVM)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless
fi
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
  echo "Installing a C/C++ toolchain and CMake (fast-downward-textworld and jericho build from source)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential cmake
fi
