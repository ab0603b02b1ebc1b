#!/usr/bin/env sh
# Render an HTML report (fedrec audit --format html, or a run's report.html) to a PNG with headless
# Chromium, to see the page as a person would.
#   usage: client/audit/render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
# Needs Debian's `chromium` (apt-get install -y chromium) or $CHROMIUM pointing at a Chrome binary.
set -eu
if [ "$#" -lt 2 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
html=$1
out=$2
size=${3:-1280x3200}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
if [ -z "$browser" ]; then
    echo "$0: no chromium found; install it (apt-get install -y chromium) or set CHROMIUM" >&2
    exit 3
fi
[ -f "$html" ] || { echo "$0: $html does not exist" >&2; exit 2; }
abs=$(cd "$(dirname "$html")" && pwd)/$(basename "$html")
mkdir -p "$(dirname "$out")"
outabs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: CI containers run as root; the page is a local file with no scripts
"$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --user-data-dir="$profile" \
    --window-size="$(echo "$size" | tr x ,)" --screenshot="$outabs" "file://$abs" >/dev/null 2>&1
[ -s "$outabs" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 4; }
echo "$outabs"
