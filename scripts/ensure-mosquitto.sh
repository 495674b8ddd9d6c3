#!/usr/bin/env bash
# Make sure Mosquitto (broker and clients) is installed: the integration tests run a real one.
# As root it installs Debian's packages; otherwise it says exactly what to install.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have mosquitto && have mosquitto_pub && have mosquitto_sub && have mosquitto_passwd; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto and mosquitto-clients from Debian's packages..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # The package starts a system broker on port 1883; the tests start their own on free ports.
  exit 0
fi
cat >&2 <<'MSG'
Mosquitto is required by the integration tests and is not installed.
Install it with:

    sudo apt-get update && sudo apt-get install -y mosquitto mosquitto-clients

(macOS: brew install mosquitto). Then run 'make test' again.
MSG
exit 1
