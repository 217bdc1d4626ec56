#!/bin/sh
# The system packages make's targets need (Makefile: the system-deps prerequisite).
#
#   sh harness/system_deps.sh [--check] PACKAGE...
#
# Checks that the commands each Debian PACKAGE provides are on PATH and installs the missing
# packages with apt-get (through sudo when not root). Prints nothing when nothing is missing.
# Where it cannot install (no apt-get, not root and no sudo, apt-get fails) it prints one line
# naming the packages and the command to run, and exits 1. --check only reports the missing
# packages (one line, exit 1) and installs nothing. Exit 2: bad arguments.
# $missing and $sudo are split into words on purpose (package names checked against KNOWN).
# shellcheck disable=SC2086
set -u

PROG=system-deps
KNOWN="openjdk-17-jre-headless prometheus chromium chromium-driver"

# What make's targets run from each package; these are what is checked.
commands_of() {
    case $1 in
        openjdk-17-jre-headless) echo java ;;
        prometheus) echo prometheus promtool ;;
        chromium) echo chromium ;;
        chromium-driver) echo chromedriver ;;
        *) return 1 ;;
    esac
}

# TorchServe 0.12 needs Java 17 or newer, and runs $JAVA_HOME/bin/java when JAVA_HOME is set.
java_is_usable() {
    java=${JAVA_HOME:+$JAVA_HOME/bin/}java
    command -v "$java" >/dev/null 2>&1 || return 1
    version=$("$java" -version 2>&1) || return 1
    # 'openjdk version "17.0.15" 2025-04-15' -> 17; Java 8 says "1.8.0_..." -> 1.
    case $version in *'version "'*) ;; *) return 1 ;; esac
    major=${version#*version \"}
    major=${major%%[!0-9]*}
    [ -n "$major" ] && [ "$major" -ge 17 ]
}

is_present() {
    for command in $(commands_of "$1"); do
        if [ "$command" = java ]; then
            java_is_usable || return 1
        else
            command -v "$command" >/dev/null 2>&1 || return 1
        fi
    done
}

# The commands of the packages named, for the messages: "java prometheus promtool".
commands_for() {
    commands=""
    for package in "$@"; do
        commands="$commands $(commands_of "$package")"
    done
    echo "${commands# }"
}

missing_of() {
    missing=""
    for package in "$@"; do
        is_present "$package" || missing="$missing $package"
    done
    echo "${missing# }"
}

check_only=false
if [ "${1:-}" = --check ]; then
    check_only=true
    shift
fi
for package in "$@"; do
    if ! commands_of "$package" >/dev/null; then
        echo "$PROG: unknown package '$package' (known: $KNOWN)" >&2
        exit 2
    fi
done

missing=$(missing_of "$@")
[ -z "$missing" ] && exit 0

# Every outcome from here is one line on stderr that starts with the missing packages.
say() {
    echo "$PROG: missing $missing; $*" >&2
}
uid=$(id -u)
sudo=""
if [ "$uid" != 0 ] && command -v sudo >/dev/null 2>&1; then
    sudo=sudo
fi
install="${sudo:+sudo }apt-get install -y --no-install-recommends $missing"

if $check_only; then
    say "run: $install"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: install them with this system's package manager" \
        "(commands needed on PATH: $(commands_for $missing))"
    exit 1
fi
if [ "$uid" != 0 ] && [ -z "$sudo" ]; then
    say "not root and no sudo: run as root: $install"
    exit 1
fi

log=$(mktemp "${TMPDIR:-/tmp}/camserve-system-deps.XXXXXX")
# The outcome finishes this line.
printf '%s' "$PROG: missing $missing; installing with ${sudo:+sudo }apt-get (log: $log)... " >&2
if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    echo "failed; run: ${sudo:+sudo }apt-get update && $install" >&2
    exit 1
fi
# Debian's package also starts a system Prometheus on *:9090, beyond loopback and on the port
# of `make monitor`; the tests and `make monitor` run their own, so that one is disabled.
case " $missing " in
    *" prometheus "*)
        if [ -d /run/systemd/system ]; then
            $sudo systemctl disable --now prometheus.service >>"$log" 2>&1
        fi
        ;;
esac
still_missing=$(missing_of $missing)
if [ -n "$still_missing" ]; then
    echo "installed, but $still_missing still not usable: check PATH (and JAVA_HOME) for" \
        "$(commands_for $still_missing) (log: $log)" >&2
    exit 1
fi
echo "done" >&2
rm -f "$log"
