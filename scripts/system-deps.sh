#!/usr/bin/env bash
# Debian tools the test tiers need; installs only what is missing.
#   lan, interop: ip, tc, unshare, node, npm
#   durability:   strace (the fsync-before-acknowledge test)
#   browser:      chromium (driven by Playwright for Python; no browser is ever downloaded),
#                 fonts for emoji and CJK so the screenshots in docs/img show the text
#   desktop:      Xvfb, xdotool, and Tk for the Python that runs the tests
#   bench:        redis-server (the broker of bench_work's Celery anchor)
set -euo pipefail
PY=${PY:-.venv/bin/python}
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v tc >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v Xvfb >/dev/null || missing+=(xvfb)
command -v xdotool >/dev/null || missing+=(xdotool)
fonts=/usr/share/fonts/truetype
[ -f $fonts/noto/NotoColorEmoji.ttf ] || missing+=(fonts-noto-color-emoji)
[ -f $fonts/wqy/wqy-microhei.ttc ] || missing+=(fonts-wqy-microhei)
[ -f $fonts/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
# The Python's _tkinter links Debian's Tk; without it `import tkinter` fails.
if [ -x "$PY" ] && ! "$PY" -c 'import _tkinter' 2>/dev/null; then missing+=(libtk8.6); fi
command -v strace >/dev/null || missing+=(strace)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "system-deps: please install: ${missing[*]} (needs root)" >&2; exit 1
  fi
  echo "system-deps: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
