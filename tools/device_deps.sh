#!/usr/bin/env bash
# Copies the headers and libraries galore's build needs (Eigen, doctest, Google
# Benchmark, from this machine's Debian packages) into .deps/, a relocatable
# prefix that travels to a GPU machine which cannot install packages:
#   tools/device_deps.sh && cmake -S . -B build -DCMAKE_PREFIX_PATH=$PWD/.deps ...
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .deps
mkdir -p .deps/include .deps/share/eigen3 .deps/lib/cmake .deps/lib/x86_64-linux-gnu/cmake
cp -r /usr/include/eigen3 .deps/include/
cp -r /usr/share/eigen3/cmake .deps/share/eigen3/
cp -r /usr/include/doctest /usr/include/benchmark .deps/include/
cp -r /usr/lib/cmake/doctest .deps/lib/cmake/
# doctest's export hard-codes /usr as its prefix.
sed -i 's|set(_IMPORT_PREFIX "/usr")|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
  .deps/lib/cmake/doctest/doctestTargets.cmake
cp -a /usr/lib/x86_64-linux-gnu/libbenchmark.so* /usr/lib/x86_64-linux-gnu/libbenchmark_main.a .deps/lib/x86_64-linux-gnu/
cp -r /usr/lib/x86_64-linux-gnu/cmake/benchmark .deps/lib/x86_64-linux-gnu/cmake/
du -sh .deps
