#!/usr/bin/env bash
# pi_setup.sh - set up the cortex-edge runtime on a Raspberry Pi 5 (Raspberry Pi OS bookworm, 64-bit).
#
#   bash pi_setup.sh [--dry-run] [--venv DIR] [--source SPEC] [--serve] [--performance] [--yes] [--help]
#
#   --dry-run      print every step, change nothing
#   --venv DIR     where to make the virtual environment (default: ~/.venvs/cortex-edge)
#   --source SPEC  what to pip-install: a folder, a wheel, or a requirement
#                  (default: this checkout if the script sits in one, else "cortex-edge")
#   --serve        also install the server extra (cortex-edge serve: starlette, uvicorn)
#   --performance  set the CPU governor to "performance" (for benchmarking; reverts at reboot)
#   --yes          do not ask before using sudo for apt
#
# Idempotent: run it again and it only does what is missing. Installs the runtime only
# (numpy, onnxruntime, tokenizers, ...): no torch on the Pi. Ends with `cortex-edge selftest`,
# which runs a packaged tiny model through onnxruntime and the NumPy jump map on this CPU.
set -euo pipefail

DRY=0
VENV="${HOME}/.venvs/cortex-edge"
SOURCE=""
PERF=0
SERVE=0
YES=0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
APT_PACKAGES=(python3 python3-venv python3-pip libgomp1)

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
run() {
  if [ "$DRY" = 1 ]; then
    printf '    [dry-run] %s\n' "$*"
  else
    "$@"
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; VENV=$2; shift 2 ;;
    --source) [ $# -ge 2 ] || die "--source needs a value"; SOURCE=$2; shift 2 ;;
    --performance) PERF=1; shift ;;
    --serve) SERVE=1; shift ;;
    --yes|-y) YES=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option: $1 (try --help)" ;;
  esac
done

if [ -z "$SOURCE" ]; then
  if [ -f "$HERE/pyproject.toml" ] && grep -q '^name = "cortex-edge"' "$HERE/pyproject.toml"; then
    SOURCE="$HERE"
  else
    SOURCE="cortex-edge"
  fi
fi

# ---------------------------------------------------------------- 1. the board and the OS
say "1/5 checking the board and OS"
MODEL="$( { tr -d '\0' < /proc/device-tree/model; } 2>/dev/null || echo unknown)"
ARCH="$(uname -m)"
BITS="$(getconf LONG_BIT 2>/dev/null || echo '?')"
USERLAND="$(dpkg --print-architecture 2>/dev/null || echo unknown)"
PAGE="$(getconf PAGESIZE 2>/dev/null || echo '?')"
echo "    board: $MODEL; kernel arch: $ARCH; userland: $USERLAND ($BITS-bit); page size: $PAGE"
case "$MODEL" in
  *"Raspberry Pi 5"*) ;;
  *) warn "this is not a Raspberry Pi 5; continuing (figures from bench will be this machine's)" ;;
esac
[ "$ARCH" = aarch64 ] || warn "kernel is $ARCH, not aarch64: the Pi 5 figures in the README do not apply"
[ "$USERLAND" = arm64 ] || [ "$USERLAND" = unknown ] || warn "userland is $USERLAND, not arm64 (the runtime needs 64-bit Raspberry Pi OS)"
if [ "$ARCH" = aarch64 ] && ! grep -qw asimddp /proc/cpuinfo 2>/dev/null; then
  warn "CPU lacks the dot-product extension (asimddp): int8 weights will be slow"
fi

# ---------------------------------------------------------------- 2. apt
say "2/5 system packages (${APT_PACKAGES[*]})"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "    all present"
else
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
    if [ "$DRY" = 0 ] && [ "$YES" = 0 ] && [ -t 0 ]; then
      read -r -p "    install ${missing[*]} with sudo apt-get? [Y/n] " ans
      case "$ans" in [nN]*) die "cannot continue without: ${missing[*]}" ;; esac
    fi
  fi
  run $SUDO apt-get update -qq
  run $SUDO apt-get install -y -qq "${missing[@]}"
fi

# ---------------------------------------------------------------- 3. venv
say "3/5 virtual environment at $VENV"
if [ -x "$VENV/bin/python" ]; then
  echo "    exists"
else
  run python3 -m venv "$VENV"
fi

# ---------------------------------------------------------------- 4. the runtime (no torch)
say "4/5 installing the cortex-edge runtime from $SOURCE (no torch)"
SPEC=$SOURCE
if [ "$SERVE" = 1 ]; then SPEC="${SOURCE}[serve]"; fi  # pip takes extras on a folder, a wheel or a name
run "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade "$SPEC"
if [ "$DRY" = 0 ] && "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  warn "torch is importable in $VENV; the runtime does not need it"
fi

# ---------------------------------------------------------------- optional: governor
if [ "$PERF" = 1 ]; then
  say "setting the CPU governor to performance (until reboot)"
  for g in /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor; do
    [ -e "$g" ] || { warn "no cpufreq governor on this machine"; break; }
    if [ "$DRY" = 1 ]; then
      printf '    [dry-run] echo performance > %s\n' "$g"
    elif [ -w "$g" ]; then
      echo performance > "$g"
    else
      echo performance | sudo tee "$g" >/dev/null
    fi
  done
fi

# ---------------------------------------------------------------- 5. self-test
say "5/5 self-test (numpy + onnxruntime + the CMS jump map on this CPU)"
run "$VENV/bin/cortex-edge" selftest
if [ "$DRY" = 0 ]; then
  say "done. Activate with: source $VENV/bin/activate; then: cortex-edge chat BUNDLE/"
else
  say "dry run: nothing was changed"
fi
