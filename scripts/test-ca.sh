#!/usr/bin/env bash
# Make a throwaway CA and a certificate for 127.0.0.1 signed by it, for the local test
# servers' TLS (scripts/kafka.sh, scripts/postgres.sh). Nothing here is a real secret.
#
#   scripts/test-ca.sh DIR NAME "CA common name"
#
# Writes DIR/ca.pem (+ ca.key) and DIR/NAME.pem with its key DIR/NAME.key (mode 600);
# does nothing when DIR/NAME.key exists already.
set -euo pipefail
dir="$1" name="$2" cn="$3"
[[ -f "$dir/$name.key" ]] && exit 0
mkdir -p "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$cn" \
  -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$dir/san.ext"
openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 3650 -extfile "$dir/san.ext" -out "$dir/$name.pem" 2>/dev/null
chmod 600 "$dir/$name.key"
