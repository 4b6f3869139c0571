#!/usr/bin/env bash
# Build (once) an aarch64 environment on this x86-64 Debian 12 machine, for the Arm tests (.ci/arm):
#   - the cross compiler aarch64-linux-gnu-g++ (Debian 12 package);
#   - qemu-aarch64 10 (user mode, static) out of Debian 13's qemu-user package: Debian 12's 7.2 shows
#     the guest the host's /proc/cpuinfo, on which torch's cpuinfo initialisation crashes;
#   - Debian 12's arm64 python3.11 and its libraries unpacked into a private sysroot (a multiarch
#     install would conflict with the host's python);
#   - PyPI's aarch64 torch wheel (a CUDA build: PyPI has no aarch64 CPU build) with pytest and numpy,
#     and one stand-in library for the CUDA libraries it links (arm_stubs.py), so it imports as a CPU
#     torch;
#   - ROOT/python3-aarch64, a launcher that is its own sys.executable (there is no binfmt_misc here,
#     so a subprocess of the emulated python could not start another one otherwise), and ROOT/xbin/g++,
#     the cross compiler with the sysroot's headers, as the JIT builds' compiler.
# usage: .ci/arm_env.sh ROOT [TORCH_VERSION]     (root for apt; writes nothing outside ROOT but apt state)
#        ARM_ENV_MINIMAL=1 .ci/arm_env.sh ROOT    the cross compiler and qemu only (the harness's needs)
# ROOT/.ready marks a finished build; a second call returns at once. About 1.7 GB.
set -euo pipefail
ROOT=$(realpath -m "$1")
TORCH_VERSION=${2:-2.13.0}
HERE=$(cd "$(dirname "$0")" && pwd)
STAMP="$ROOT/.ready-torch$TORCH_VERSION"
[ -f "$STAMP" ] && exit 0
mkdir -p "$ROOT"/{debs,sysroot,site,stubs,xbin,wheels}
cd "$ROOT"

retry() {  # retry a download a few times: one dropped connection must not fail CI
  local n
  for n in 1 2 3 4; do "$@" && return 0; echo "arm_env: retrying ($n): $*" >&2; sleep $((5 * n)); done
  return 1
}
PIP=(python3 -m pip)
command -v pip >/dev/null && PIP=(pip)

echo "arm_env: cross compiler" >&2
if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  retry apt-get update -q >/dev/null
  retry apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu binutils-aarch64-linux-gnu >/dev/null
fi

echo "arm_env: qemu-aarch64 10 (Debian 13's qemu-user)" >&2
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if [ ! -x xbin/qemu-aarch64 ]; then
  retry curl -sfo debs/trixie-Packages.xz "$MIRROR/dists/trixie/main/binary-amd64/Packages.xz"
  # (awk reads to the end: an early exit would make xz die of SIGPIPE, which pipefail turns into a failure)
  QDEB=$(xz -dc debs/trixie-Packages.xz | awk '/^Package: qemu-user$/{f=1} f && /^Filename:/ && !done {print $2; done=1}')
  [ -n "$QDEB" ] || { echo "arm_env: qemu-user not found in Debian 13's index" >&2; exit 1; }
  retry curl -sfo debs/qemu-user.deb "$MIRROR/$QDEB"
  dpkg-deb --fsys-tarfile debs/qemu-user.deb | tar -x -O ./usr/bin/qemu-aarch64 > xbin/qemu-aarch64
  chmod +x xbin/qemu-aarch64
fi

# ARM_ENV_MINIMAL=1: the cross compiler and qemu only, all the torch-free harness needs (no stamp)
[ "${ARM_ENV_MINIMAL:-0}" = 1 ] && exit 0

echo "arm_env: arm64 python3.11 sysroot" >&2
if [ ! -x sysroot/usr/bin/python3.11 ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
  fi
  retry apt-get update -q >/dev/null
  PKGS="libc6 libgcc-s1 libstdc++6 libgomp1 zlib1g libzstd1 liblzma5 libbz2-1.0 libffi8 libexpat1 libssl3
        libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libcrypt1 libnsl2 libtirpc3 libdb5.3
        libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2
        libpython3.11-minimal libpython3.11-stdlib libpython3.11 libpython3.11-dev python3.11-minimal python3.11"
  (cd debs && retry apt-get download -q $(for p in $PKGS; do printf '%s:arm64 ' "$p"; done) media-types >/dev/null)
  for d in debs/*_arm64.deb debs/media-types_*.deb; do dpkg-deb -x "$d" sysroot; done
fi

echo "arm_env: aarch64 torch $TORCH_VERSION and the test dependencies" >&2
if [ ! -d site/torch ]; then
  WHEEL=torch-$TORCH_VERSION-cp311-cp311-manylinux_2_28_aarch64.whl
  [ -f "wheels/$WHEEL" ] || retry "${PIP[@]}" download -q --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 3.11 "torch==$TORCH_VERSION" -d wheels
  python3 -m zipfile -e "wheels/$WHEEL" site
fi
retry "${PIP[@]}" install -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
  --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --target site --upgrade \
  typing_extensions sympy mpmath filelock networkx jinja2 markupsafe fsspec setuptools numpy pytest \
  iniconfig pluggy packaging pygments 2>&1 | grep -v "^WARNING: Location" >&2 || true
python3 -c "import sys; sys.path.insert(0, '$ROOT/site'); import numpy, pytest" 2>/dev/null || \
  [ -d site/numpy ] || { echo "arm_env: numpy/pytest did not install into $ROOT/site" >&2; exit 1; }

echo "arm_env: CUDA stand-in library" >&2
python3 "$HERE/arm_stubs.py" site sysroot stubs
(cd stubs && aarch64-linux-gnu-gcc -shared -fPIC -O1 -Wl,--version-script=stub.map -Wl,-soname,libsa_cudastub.so \
   -o libsa_cudastub.so stub.c && while read -r lib; do [ -n "$lib" ] && ln -sf libsa_cudastub.so "$lib"; done < missing.txt)

cat > python3-aarch64 <<EOS
#!/usr/bin/env bash
# the arm64 python under qemu-user (QEMU_CPU picks the emulated core: max, neoverse-n1, neoverse-v1, ...)
export QEMU_CPU=\${QEMU_CPU:-max} PYTHONHOME=$ROOT/sysroot/usr LD_LIBRARY_PATH=$ROOT/stubs
export PYTHONPATH=$ROOT/site\${PYTHONPATH:+:\$PYTHONPATH}
exec $ROOT/xbin/qemu-aarch64 -L $ROOT/sysroot -0 $ROOT/python3-aarch64 $ROOT/sysroot/usr/bin/python3.11 "\$@"
EOS
cat > xbin/g++ <<EOS
#!/usr/bin/env bash
# the cross compiler as the emulated python's JIT compiler (the sysroot has python's arm64 headers)
exec aarch64-linux-gnu-g++ -idirafter $ROOT/sysroot/usr/include "\$@" -Wl,-rpath-link,$ROOT/stubs
EOS
NINJA=$(command -v ninja || true)
[ -n "$NINJA" ] && ln -sf "$NINJA" xbin/ninja
chmod +x python3-aarch64 xbin/g++
touch "$STAMP"
echo "arm_env: ready in $ROOT" >&2
