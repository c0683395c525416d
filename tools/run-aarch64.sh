#!/usr/bin/env bash
# run-aarch64.sh - cortex-edge's copy of the shared qemu-user recipe: runs a command against an
# emulated aarch64 CPython 3.11 that mimics a
# Raspberry Pi 5 on Raspberry Pi OS bookworm (Debian 12 python3.11 + pip 23.0.1, glibc 2.36,
# Cortex-A76 CPU model), on an x86_64 Debian/Ubuntu host, using qemu-user WITHOUT binfmt_misc.
#
#   run-aarch64.sh [--cache DIR] [--setup-only|--info|--check-16k] [--] CMD [ARGS...]
#   e.g.  run-aarch64.sh python -m pytest tests/runtime
#         ARM_REQUIREMENTS=requirements.txt run-aarch64.sh python -m pytest -q
#
# CMD runs on the host with PATH=$CACHE/venv/bin:$PATH and VIRTUAL_ENV set, so `python`,
# `python3`, `pip`, `pytest` ... are the emulated aarch64 ones (sys.executable too, so
# subprocess/multiprocessing-spawn of sys.executable also works without binfmt_misc).
#
# Cache layout ($ARM_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/run-aarch64):
#   sysroot/   arm64 .debs (python3.11 + deps) extracted with dpkg-deb (no chroot, no root)
#   qemu/      qemu-aarch64 (static) extracted from Debian bookworm-backports qemu-user 10.x
#   venv/      a real venv: bin/python is a host sh wrapper that execs qemu; site-packages aarch64
#   pip-cache/ pip's download cache
#
# Environment knobs (all optional):
#   ARM_CACHE         cache dir (same as --cache)
#   ARM_PACKAGES      packages to pip-install (default: "numpy onnxruntime psutil click pytest")
#   ARM_REQUIREMENTS  space-separated requirements files to pip-install too (content is hashed)
#   ARM_PIP_ARGS      extra pip install args (default: --only-binary=:all:  -> missing aarch64
#                     wheels fail loudly instead of compiling sdists under emulation)
#   ARM_PIP_UPGRADE=1 upgrade pip first (default keeps Debian's pip 23.0.1, as on Pi OS)
#   ARM_EXTRA_DEBS    extra arm64 Debian packages for the sysroot (e.g. "libgl1 libglib2.0-0")
#   ARM_QEMU          path to an x86_64 qemu-aarch64 binary to use instead of the cached one
#   ARM_QEMU_CPU      CPU model (default cortex-a76 = Pi 5; "max" enables SVE/SME/i8mm...)
#   ARM_DEBIAN_MIRROR / ARM_DEBIAN_SECURITY / ARM_DEBIAN_SUITE / ARM_DEBIAN_KEYRING
# In the command's environment ARM_EMULATED=1 is set so tests can relax timing assertions.
set -euo pipefail

SCRIPT_VERSION=3
log() { printf '[run-aarch64 +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

CACHE=${ARM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/run-aarch64}
MODE=run
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) CACHE=$2; shift 2 ;;
    --cache=*) CACHE=${1#--cache=}; shift ;;
    --setup-only) MODE=setup; shift ;;
    --info) MODE=info; shift ;;
    --check-16k) MODE=check16k; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ "$MODE" != run ] || [ $# -gt 0 ] || die "no command given (try --help)"

[ "$(uname -m)" = x86_64 ] || die "host must be x86_64 (on a real aarch64 box just use a venv)"
for t in apt-get dpkg-deb flock sha256sum tar; do command -v "$t" >/dev/null || die "missing host tool: $t"; done

# The Debian mirrors: taken from the host's own apt sources unless given.
host_apt_uris() {
  { awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | awk '!seen[$0]++'
}
MIRROR=${ARM_DEBIAN_MIRROR:-$(host_apt_uris | grep -E '/debian/?$' | head -n 1 || true)}
SECURITY=${ARM_DEBIAN_SECURITY:-$(host_apt_uris | grep -E '/debian-security/?$' | head -n 1 || true)}
[ -n "$MIRROR" ] || die "no Debian mirror found in the host's apt sources; set ARM_DEBIAN_MIRROR"
[ -n "$SECURITY" ] || SECURITY=${MIRROR%/debian}/debian-security
SUITE=${ARM_DEBIAN_SUITE:-bookworm}
KEYRING=${ARM_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
# cortex-edge's runtime extra (no torch) + what its device-side tests need; versions as in pyproject.toml
PACKAGES=${ARM_PACKAGES-numpy==2.4.6 onnxruntime==1.31.1 tokenizers==0.23.3 safetensors==0.8.0 filelock==4.3.1 jinja2 click psutil tqdm starlette==1.10.0 uvicorn==0.54.0 sse-starlette==3.7.0 pytest hypothesis}
PIP_ARGS=${ARM_PIP_ARGS---only-binary=:all:}
SYSROOT_DEBS="python3.11 python3.11-venv libstdc++6 libgcc-s1 libgomp1 ${ARM_EXTRA_DEBS:-}"
# pulled in only by maintainer-script deps; their binaries would shadow host tools under qemu -L
SKIP_DEBS=" dpkg tar debconf openssl "

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
case "$CACHE" in *[[:space:]]*) die "cache path must not contain spaces: $CACHE" ;; esac
SYSROOT=$CACHE/sysroot
VENV=$CACHE/venv

# ---------------------------------------------------------------- private apt (no root needed)
# apt_setup ARCH DIR "SOURCES": sets APT_OPTS for apt-get against private lists/cache in DIR and
# an empty dpkg status; never touches the host's dpkg database, /etc/apt or /var/lib/apt.
apt_setup() {
  local arch=$1 dir=$2 sources=$3
  mkdir -p "$dir"/state/lists/partial "$dir"/cache/archives/partial "$dir"/etc/apt.conf.d \
           "$dir"/etc/preferences.d "$dir"/etc/sources.list.d
  : > "$dir/state/status"
  printf '%s\n' "$sources" > "$dir/etc/sources.list"
  APT_OPTS=(-o "APT::Architecture=$arch" -o "APT::Architectures::=$arch"
    -o "Dir::State=$dir/state" -o "Dir::State::status=$dir/state/status"
    -o "Dir::Cache=$dir/cache" -o "Dir::Etc::SourceList=$dir/etc/sources.list"
    -o "Dir::Etc::SourceParts=$dir/etc/sources.list.d" -o "Dir::Etc::Parts=$dir/etc/apt.conf.d"
    -o "Dir::Etc::Preferences=$dir/etc/preferences" -o "Dir::Etc::PreferencesParts=$dir/etc/preferences.d"
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)" -o "Acquire::Retries=3"
    -o "APT::Install-Recommends=0" -o "quiet=1")
  apt-get "${APT_OPTS[@]}" update >&2
}

# ---------------------------------------------------------------- qemu
setup_qemu() {
  if [ -n "${ARM_QEMU:-}" ]; then QEMU=$ARM_QEMU; [ -x "$QEMU" ] || die "ARM_QEMU=$QEMU not executable"; return; fi
  QEMU=$CACHE/qemu/qemu-aarch64
  [ -x "$QEMU" ] && return
  if [ -f "$CACHE/qemu.fallback" ] && [ -x "$(cat "$CACHE/qemu.fallback")" ]; then QEMU=$(cat "$CACHE/qemu.fallback"); return; fi
  log "fetching qemu-user (static) from $SUITE-backports"
  local t=$CACHE/qemu.tmp; rm -rf "$t"; mkdir -p "$t"
  local ha; ha=$(dpkg --print-architecture 2>/dev/null || echo amd64)
  if apt_setup "$ha" "$t/apt" "deb [arch=$ha signed-by=$KEYRING] $MIRROR $SUITE-backports main" 2>/dev/null &&
     (cd "$t" && apt-get "${APT_OPTS[@]}" download "qemu-user/$SUITE-backports" >&2) &&
     dpkg-deb --fsys-tarfile "$t"/qemu-user_*.deb | tar -x -C "$t" ./usr/bin/qemu-aarch64 &&
     "$t/usr/bin/qemu-aarch64" --version >/dev/null; then
    mkdir -p "$CACHE/qemu"; mv "$t/usr/bin/qemu-aarch64" "$QEMU"; rm -rf "$t"
  else
    rm -rf "$t"
    QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
    [ -n "$QEMU" ] || die "no qemu: backports download failed and no qemu-aarch64(-static) installed (apt-get install qemu-user-static)"
    log "WARNING: falling back to system $QEMU ($("$QEMU" --version | head -1)); rm $CACHE/qemu.fallback to retry"
    echo "$QEMU" > "$CACHE/qemu.fallback"
  fi
}

# ---------------------------------------------------------------- sysroot
setup_sysroot() {
  # SYSROOT_DEBS is a word list on purpose
  local stamp
  # shellcheck disable=SC2086
  stamp=$(printf '%s\n' "$SCRIPT_VERSION" "$SUITE" "$MIRROR" $SYSROOT_DEBS | sha256sum | cut -c1-16)
  [ -f "$SYSROOT/.stamp" ] && [ "$(cat "$SYSROOT/.stamp")" = "$stamp" ] && return
  log "building arm64 sysroot ($SUITE: $SYSROOT_DEBS)"
  local t=$CACHE/sysroot.tmp; rm -rf "$t"; mkdir -p "$t/root"
  apt_setup arm64 "$t/apt" "deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR $SUITE-updates main
deb [arch=arm64 signed-by=$KEYRING] $SECURITY $SUITE-security main" || die "apt-get update (arm64) failed"
  # dependency closure against an EMPTY dpkg status = everything python3.11 needs
  # shellcheck disable=SC2086
  apt-get "${APT_OPTS[@]}" -y --download-only install $SYSROOT_DEBS >&2 || die "arm64 package download failed"
  local d p
  for d in "$t"/apt/cache/archives/*.deb; do
    p=$(dpkg-deb -f "$d" Package)
    case "$SKIP_DEBS" in *" $p "*) continue ;; esac
    dpkg-deb -x "$d" "$t/root"
    printf '%s %s\n' "$p" "$(dpkg-deb -f "$d" Version)" >> "$t/root/.manifest"
  done
  [ -x "$t/root/usr/bin/python3.11" ] || die "sysroot has no python3.11"
  echo "$stamp" > "$t/root/.stamp"
  rm -rf "$SYSROOT" "$VENV"          # venv is tied to the sysroot's python
  mv "$t/root" "$SYSROOT"; rm -rf "$t"
}

# qemu < 8.1 shows the HOST's x86 /proc/cpuinfo; onnxruntime's cpuinfo init then segfaults on
# import.  In that case shadow it with a Pi-5-like one via the -L prefix (side effect: listing
# /proc inside the guest shows only 'cpuinfo', so psutil.pids() breaks).  qemu >= 8.1 emulates it.
setup_cpuinfo() {
  local id; id="$QEMU|$("$QEMU" --version | head -1)"
  [ -f "$SYSROOT/.qemu-id" ] && [ "$(cat "$SYSROOT/.qemu-id")" = "$id" ] && return
  rm -rf "$SYSROOT/proc"
  if "$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -I -S -c \
      "import sys; sys.exit(0 if 'CPU implementer' in open('/proc/cpuinfo').read() else 1)"; then :
  else
    log "qemu does not emulate aarch64 /proc/cpuinfo; installing a fake one in the sysroot"
    mkdir -p "$SYSROOT/proc"
    local i n; n=$(getconf _NPROCESSORS_CONF)
    for ((i = 0; i < n; i++)); do
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
    done > "$SYSROOT/proc/cpuinfo"
  fi
  echo "$id" > "$SYSROOT/.qemu-id"
}

# ---------------------------------------------------------------- venv with a qemu wrapper
write_if_changed() {  # FILE CONTENT
  if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then printf '%s\n' "$2" > "$1.tmp"; mv "$1.tmp" "$1"; fi
}
setup_venv() {
  mkdir -p "$VENV/bin" "$VENV/lib/python3.11/site-packages"
  [ -e "$VENV/lib64" ] || ln -s lib "$VENV/lib64"
  write_if_changed "$VENV/pyvenv.cfg" "home = $SYSROOT/usr/bin
include-system-site-packages = false
version = 3.11"
  # argv[0] is forced to this wrapper (-0 "\$0"), so sys.executable is the wrapper and the
  # pyvenv.cfg next to it makes this a venv; children started via sys.executable re-enter qemu.
  write_if_changed "$VENV/bin/python" "#!/bin/sh
# generated by run-aarch64.sh: aarch64 CPython 3.11 (Debian $SUITE) under qemu-user, no binfmt
exec \"$QEMU\" -cpu \"\${ARM_QEMU_CPU:-cortex-a76}\" -L \"$SYSROOT\" -0 \"\$0\" \"$SYSROOT/usr/bin/python3.11\" \"\$@\""
  chmod +x "$VENV/bin/python"
  ln -sf python "$VENV/bin/python3"; ln -sf python "$VENV/bin/python3.11"
  if [ ! -f "$VENV/lib/python3.11/site-packages/pip/__init__.py" ]; then
    log "bootstrapping pip (Debian's ensurepip wheel)"
    "$VENV/bin/python" -m ensurepip --default-pip >&2 || die "ensurepip failed"
  fi
}

setup_packages() {
  local f h=""
  for f in ${ARM_REQUIREMENTS:-}; do [ -f "$f" ] || die "ARM_REQUIREMENTS file not found: $f"; h="$h$(sha256sum < "$f")"; done
  local stamp; stamp=$(printf '%s\n' "$SCRIPT_VERSION" "$PACKAGES" "$PIP_ARGS" "${ARM_PIP_UPGRADE:-}" "${ARM_REQUIREMENTS:-}" "$h" | sha256sum | cut -c1-16)
  [ -f "$VENV/.pkg-stamp" ] && [ "$(cat "$VENV/.pkg-stamp")" = "$stamp" ] && return
  local args=() pk=()
  for f in ${ARM_REQUIREMENTS:-}; do args+=(-r "$f"); done
  read -ra pk <<< "$PACKAGES"; args+=(${pk[@]+"${pk[@]}"})
  export PIP_CACHE_DIR=$CACHE/pip-cache PIP_DISABLE_PIP_VERSION_CHECK=1
  if [ -n "${ARM_PIP_UPGRADE:-}" ]; then "$VENV/bin/python" -m pip install -q --upgrade pip >&2; fi
  if [ ${#args[@]} -gt 0 ]; then
    log "pip install (emulated) $PIP_ARGS ${args[*]}"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install $PIP_ARGS "${args[@]}" >&2 || die "pip install failed (no aarch64 wheel? see above)"
  fi
  echo "$stamp" > "$VENV/.pkg-stamp"
}

check16k() {  # glibc refuses PT_LOAD segments not aligned to the page size; Pi 5 kernel = 16 KiB
  "$VENV/bin/python" -I - "$VENV/lib/python3.11/site-packages" "$@" <<'EOF'
import os, struct, sys
PAGE = int(os.environ.get("ARM_PAGE_SIZE", "16384"))
bad = checked = 0
for root in sys.argv[1:]:
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            if not (fn.endswith(".so") or ".so." in fn) or os.path.islink(p):
                continue
            with open(p, "rb") as f:
                h = f.read(64)
                if len(h) < 64 or h[:4] != b"\x7fELF" or h[4] != 2:
                    continue
                phoff, = struct.unpack_from("<Q", h, 32)
                phentsize, phnum = struct.unpack_from("<HH", h, 54)
                f.seek(phoff); ph = f.read(phentsize * phnum)
            checked += 1
            for i in range(phnum):
                typ, _, off, vaddr, _, _, _, align = struct.unpack_from("<IIQQQQQQ", ph, i * phentsize)
                if typ == 1 and (align % PAGE or (vaddr - off) % PAGE):
                    bad += 1
                    print(f"NOT loadable with {PAGE}-byte pages: {p} (PT_LOAD p_align={align:#x})")
                    break
print(f"check-16k: {checked} ELF objects, {bad} not loadable on a {PAGE}-byte-page kernel")
sys.exit(1 if bad else 0)
EOF
}

# ---------------------------------------------------------------- main
exec 9>"$CACHE/.lock"
flock 9                      # serialise concurrent setups sharing one cache
setup_qemu
setup_sysroot
setup_cpuinfo
setup_venv
setup_packages
exec 9>&-

export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH" ARM_EMULATED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONHOME
case "$MODE" in
  setup) log "ready: $VENV/bin/python ($(du -sh "$CACHE" | cut -f1) in $CACHE)" ;;
  info)
    "$QEMU" --version | head -1
    python -c "import platform,sys; print(platform.machine(), sys.version.split()[0], platform.libc_ver(), sys.executable)"
    python -c "import numpy as np, onnxruntime as ort; from numpy._core._multiarray_umath import __cpu_features__ as f; print('numpy', np.__version__, 'SIMD:', ' '.join(k for k, v in f.items() if v)); print('onnxruntime', ort.__version__, ort.get_available_providers())" 2>/dev/null || true
    python -m pip list --format=freeze 2>/dev/null | grep -iE '^(numpy|onnxruntime|psutil|click|pytest|pip)=' || true
    du -sh "$SYSROOT" "$CACHE/qemu" "$VENV" "$CACHE/pip-cache" 2>/dev/null || true ;;
  check16k) check16k "$@" ;;
  run) exec "$@" ;;
esac
