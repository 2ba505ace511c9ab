#!/usr/bin/env bash
# The main job: start the kernel with its embedded defaults, deploy examples/hello, show it
# answering, tear it down. Run as root for the enforced setup; as a user it runs unenforced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
C=.venv/bin/corral
APP=examples/hello

# corrald's own output goes under the corral home it uses (corral.host.home(): CORRAL_HOME,
# else /var/lib/corral as root, else the XDG data dir), never into the work tree.
CORRAL_HOME_DIR=$(.venv/bin/python -c 'from corral.host import home; print(home())')
mkdir -p "$CORRAL_HOME_DIR"
KLOG="$CORRAL_HOME_DIR/corrald.log"
echo "== corrald (log: $KLOG)"
.venv/bin/corrald --stop-drivers >"$KLOG" 2>&1 &
KPID=$!
cleanup() {
  $C down hello >/dev/null 2>&1 || true
  kill "$KPID" 2>/dev/null || true
  wait "$KPID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do $C drivers >/dev/null 2>&1 && break; sleep 0.1; done

echo "== corral drivers"; $C drivers
echo "== corral check $APP"; $C check $APP >/dev/null && echo "manifest ok"
echo "== corral up $APP"; $C up $APP
echo "== corral ps"; $C ps
port=$($C check $APP | python3 -c 'import json,sys; print(json.load(sys.stdin)["ports"]["http"])')
echo "== curl http://127.0.0.1:$port/"; curl -fsS "http://127.0.0.1:$port/"
if $C drivers --json | grep -q '"capability": "lb"'; then
  front=$($C check $APP | python3 -c 'import json,sys; print(json.load(sys.stdin)["lb"]["frontend"])')
  echo "== through the lb: curl -H 'Host: hello.corral.test' http://127.0.0.1:$front/"
  curl -fsS -m 5 -H "Host: hello.corral.test" "http://127.0.0.1:$front/" || echo "(lb frontend not answering)"
fi
echo "== corral logs hello"; $C logs hello -n 5 || true
echo "== corral down hello"; $C down hello
echo "== corral ledger --owner hello (nothing held after down)"; $C ledger --owner hello
