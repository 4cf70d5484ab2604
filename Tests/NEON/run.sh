#!/usr/bin/env bash
# The NEON kernels under emulation: builds CKernels and check.c for aarch64 Linux (the toolchain's
# clang, Debian's aarch64 C library) and runs the check under qemu-aarch64 twice: `-cpu max` (NEON
# and the SDOT tier) and `-cpu cortex-a53` (an ARMv8.0 core: NEON only, so the SDOT tier must be
# refused and detection must fall back). Installs the cross C library and qemu-user if missing.
# Emulation proves results, never speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
packages=()
dpkg -s libc6-dev-arm64-cross >/dev/null 2>&1 || packages+=(libc6-dev-arm64-cross)
dpkg -s libgcc-12-dev-arm64-cross >/dev/null 2>&1 || packages+=(libgcc-12-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || packages+=(qemu-user)
if [ ${#packages[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
out="${TMPDIR:-/tmp}/st-neon-check.$$"
trap 'rm -f "$out"' EXIT
# Linked with the toolchain's lld: the host's default linker (ld.gold here) cannot link aarch64,
# and Debian's cross binutils are not needed then.
clang --target=aarch64-linux-gnu -fuse-ld=lld -O2 -std=c11 -Wall -Werror -I Sources/CKernels/include Tests/NEON/check.c \
    Sources/CKernels/*.c -lm -o "$out"
echo "qemu-aarch64 -cpu max:"
qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu "$out"
echo "qemu-aarch64 -cpu cortex-a53 (no dot-product extension):"
qemu-aarch64 -cpu cortex-a53 -L /usr/aarch64-linux-gnu "$out" | tee "$out.log"
grep -q "neon-dotprod: not on this CPU" "$out.log" && grep -q "^detected: 3 " "$out.log"
rm -f "$out.log"
