#!/bin/sh
# The set-up behind the README's two commands: `./setup.sh` for the app, `./setup.sh --tests`
# for the tests. It installs only what is missing, so a second run is quick and says nothing:
# - what pip cannot bring, with apt-get where there is one (sudo when not root): python3-venv,
#   and for the tests Debian's Chromium, nginx, redis-server and npm; elsewhere it names them;
# - .venv, with requirements.txt (or requirements-test.txt) in it;
# - for the tests, node_modules from package-lock.json (axe-core, for the accessibility checks).
set -e
cd "$(dirname "$0")"
case "$1" in
    "") requirements=requirements.txt ;;
    --tests) requirements=requirements-test.txt ;;
    *) echo "usage: ./setup.sh [--tests]" >&2; exit 2 ;;
esac

need=""
# Debian's python3 has venv but not ensurepip, which venv needs to put pip in .venv.
[ -x .venv/bin/pip ] || python3 -c "import ensurepip" 2>/dev/null || need="$need python3-venv"
if [ "$1" = --tests ]; then
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need="$need chromium"
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need="$need nginx"
    command -v redis-server >/dev/null || need="$need redis-server"
    command -v npm >/dev/null || need="$need npm"
fi

if [ -n "$need" ]; then
    if ! command -v apt-get >/dev/null; then
        echo "setup.sh: please install$need (no apt-get here to do it), then run it again" >&2
        exit 1
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "setup.sh: installing$need with apt-get (a few minutes the first time)"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    # Installing nginx or Redis starts them as system services, which the tests do not use:
    # they start their own on free ports.
    for service in nginx redis-server; do
        case " $need " in *" $service "*) $sudo service $service stop >/dev/null 2>&1 || true ;; esac
    done
fi

[ -x .venv/bin/pip ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r $requirements
if [ "$1" = --tests ]; then
    npm ls >/dev/null 2>&1 || npm ci --silent
fi
