#!/usr/bin/env bash
# confedge on a bare Debian/Ubuntu host, from this checkout: ./install.sh (as root), then
# `confedge setup`. docs/SETUP.md, "Install", says what it does and why; `--help` lists the options.
#
# What it does, each step only when needed, so that running it again upgrades in place:
#   1. the Debian packages the build and the host integration use (python3-venv, gcc and the
#      Python headers for the compiled build, libnghttp2-dev for the HTTP/2 engine, nftables for
#      `confedge firewall`, clang and libbpf-dev for the eBPF relay offload), only those missing;
#   2. a virtual environment in PREFIX (/opt/confedge) with confedge built from this checkout;
#   3. BINDIR/confedge (/usr/local/bin), a link to it, so that `confedge ...` works as the docs
#      write it, for root and in the systemd unit `confedge install-service` writes;
#   4. the next steps for this host.
set -euo pipefail
# Readable by the service user whatever root's umask: `confedge install-service` runs the
# environment's interpreter as an unprivileged user (a umask of 077 left it unable to start).
umask 022

PREFIX=/opt/confedge
BINDIR=/usr/local/bin
APT=1
PURE=0
OFFLOAD=1
PYTHON=${PYTHON:-python3}

usage() {
    cat <<'EOF'
usage: ./install.sh [--prefix DIR] [--bindir DIR] [--no-apt] [--pure] [--no-offload]

Installs confedge from this checkout on a Debian or Ubuntu host; run it again to upgrade.

  --prefix DIR    the virtual environment confedge is installed into (default /opt/confedge)
  --bindir DIR    where the `confedge` command is linked (default /usr/local/bin)
  --no-apt        install no Debian packages; only say which are missing
  --pure          skip compiling (CONFEDGE_PURE=1): slower proxy and TURN, no gcc needed
  --no-offload    do not install clang/libbpf-dev (the eBPF relay offload is then not built)
  -h, --help      this text

The environment variable PYTHON names the interpreter (default python3; 3.11 or newer).
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --bindir) [ $# -ge 2 ] || die "--bindir needs a directory"; BINDIR=$2; shift 2 ;;
        --bindir=*) BINDIR=${1#*=}; shift ;;
        --no-apt) APT=0; shift ;;
        --pure) PURE=1; shift ;;
        --no-offload) OFFLOAD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path (it is written into scripts): $PREFIX" ;; esac
case "$BINDIR" in /*) ;; *) die "--bindir must be an absolute path: $BINDIR" ;; esac
[ -n "${PREFIX%/}" ] || die "--prefix must not be /"

SRC=$(cd "$(dirname "$0")" && pwd)
[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/src/confedge" ] ||
    die "run it from a confedge checkout (no pyproject.toml and src/confedge beside it in $SRC)"

# Checked before anything is installed: a `confedge` there that this script did not link (another
# installation, a wrapper) is not replaced behind the operator's back.
link="$BINDIR/confedge"
if [ -e "$link" ] && [ ! -L "$link" ]; then
    die "$link exists and is not a link made by this script; remove it or choose another --bindir"
fi

# -- the interpreter -----------------------------------------------------------------------------
# Checked before anything is installed where there is one (an Ubuntu 22.04's 3.10 is refused
# here, not after minutes of packages). A minimal host (a container image, debootstrap's
# minbase) has none: the Debian packages below then bring Debian's, checked once it is there.
python_ok() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && return 0
    found=$("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "?")
    die "confedge needs Python 3.11 or newer; $PYTHON is $found (Debian 12 and 13 and Ubuntu 24.04 have it; or set PYTHON)"
}
bring_python=0
if command -v "$PYTHON" >/dev/null 2>&1; then
    python_ok
elif [ "$PYTHON" = python3 ] && [ "$APT" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    bring_python=1
else
    die "no $PYTHON on this host: apt-get install python3 (Debian 12 has 3.11), or set PYTHON"
fi

# -- Debian packages ---------------------------------------------------------------------------
wanted="python3-venv ca-certificates nftables"
[ "$bring_python" = 0 ] || wanted="python3 $wanted"
[ "$PURE" = 1 ] || wanted="$wanted gcc python3-dev libnghttp2-dev"
[ "$OFFLOAD" = 0 ] || [ "$PURE" = 1 ] || wanted="$wanted clang llvm libbpf-dev"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
    for p in $wanted; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing="$missing $p"
    done
    missing=${missing# }
else
    echo "install.sh: not a Debian-based host: install the equivalents of: $wanted" >&2
fi
if [ -n "$missing" ]; then
    if [ "$APT" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> Debian packages: $missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086  # one word per package
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
    elif [ "$APT" = 1 ] && [ "$(id -u)" != 0 ]; then
        die "these Debian packages are missing: $missing (run as root, or: sudo apt-get install $missing)"
    else
        echo "install.sh: not installing the missing Debian packages: $missing" >&2
    fi
fi
if [ "$bring_python" = 1 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "apt-get installed python3 but there is still no $PYTHON"
    python_ok
fi
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$PYTHON cannot make a virtual environment: apt-get install python3-venv"

# -- the virtual environment ------------------------------------------------------------------
if [ -x "$PREFIX/bin/python" ]; then
    echo "==> upgrading confedge in $PREFIX"
    was=$("$PREFIX/bin/python" -c 'import confedge; print(confedge.__version__)' 2>/dev/null || echo "")
else
    [ ! -e "$PREFIX" ] || [ -z "$(ls -A "$PREFIX" 2>/dev/null)" ] ||
        die "$PREFIX exists and is not a confedge environment; choose another --prefix or remove it"
    echo "==> virtual environment in $PREFIX"
    mkdir -p "$(dirname "$PREFIX")" || die "cannot create $(dirname "$PREFIX")"
    "$PYTHON" -m venv "$PREFIX" || die "cannot create the virtual environment $PREFIX"
    was=""
fi
echo "==> building and installing confedge (a few minutes for the compiled build)"
# From a clean copy of the sources: setuptools builds in the tree it is given, and files left in
# a checkout's build/ (a module since removed, an extension built in place) must not end up in
# the installation.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/pip.log"
mkdir "$work/src"
tar -C "$SRC" -cf - pyproject.toml setup.py README.md LICENSE src |
    tar -C "$work/src" -xf - --exclude='*.so' --exclude='*.o' --exclude='__pycache__' \
        --exclude='*.egg-info'
if ! CONFEDGE_PURE=$([ "$PURE" = 1 ] && echo 1 || echo "") \
    "$PREFIX/bin/python" -m pip install -v --disable-pip-version-check --upgrade "$work/src[redis]" \
    >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "pip could not build or install confedge (its last lines above; the whole log: re-run with bash -x)"
fi
# What the build said of the parts it could not make (setup.py's "confedge: ..." lines; pip shows
# a build's own output only with -v, hence the log).
sed -n 's/^ *\(confedge: .*\)$/    \1/p' "$log" | sort -u

# The service runs as an unprivileged user (`confedge install-service`): the environment's
# interpreter must be reachable by one. A Python under a private home (pyenv in /root) is not,
# and the service would fail at its first worker, far from this cause. The check is an exec
# made by the unprivileged user (through a shell), as a worker's is.
nobody_runs() {
    # shellcheck disable=SC2016  # $0 is the inner shell's: the interpreter's path
    setpriv --reuid=nobody --regid=nogroup --clear-groups \
        /bin/sh -c 'exec "$0" -c ""' "$1" 2>/dev/null
}
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1 && ! nobody_runs "$PREFIX/bin/python"; then
    echo "install.sh: warning: an unprivileged user cannot run $PREFIX/bin/python" \
        "($(readlink -f "$PREFIX/bin/python")), so the service user cannot either:" \
        "install with the system's interpreter (PYTHON=/usr/bin/python3 ./install.sh)" >&2
fi

# -- the command ----------------------------------------------------------------------------------
mkdir -p "$BINDIR" || die "cannot create $BINDIR"
ln -sfn "$PREFIX/bin/confedge" "$link"
version=$("$link" --version) || die "$link --version failed: the installation is broken"
echo "==> ${version%%$'\n'*}${was:+ (was $was)}: $link -> $PREFIX/bin/confedge"
# Which parts are native here, and why not where they are not (the compiled proxy, libnghttp2,
# the TURN data plane, the eBPF offload): a missing compiler or header shows up now, not later.
printf '%s\n' "$version" | tail -n +2 | sed 's/^/    /'
if [ "$PURE" = 0 ] && printf '%s\n' "$version" | grep -q '^proxy hot path: interpreted'; then
    echo "install.sh: warning: the proxy was not compiled (the build's reason is above); it works," \
        "at more CPU per request: install gcc and python3-dev and run install.sh again" >&2
fi

# -- next steps -----------------------------------------------------------------------------------
conf=/etc/confedge/confedge.toml
echo
if [ -f "$conf" ]; then
    echo "A configuration is already there ($conf):"
    echo "  confedge check --config $conf     # still valid for this version?"
    echo "  systemctl restart confedge          # if the service runs: start the new version"
else
    echo "Next:"
    echo "  confedge setup                                        # the questions; writes $conf"
    echo "  confedge cert install --cert fullchain.pem --key key.pem   # or a self-signed one at first start"
    echo "  confedge firewall --config $conf --apply"
    echo "  confedge install-service && systemctl enable --now confedge"
    echo "docs/SETUP.md walks through each."
fi
