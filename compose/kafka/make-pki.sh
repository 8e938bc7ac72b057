#!/bin/bash
# The compose deployment's Kafka PKI and SASL passwords, made with openssl on the host:
#
#   FENCER_KAFKA_EXTERNAL_HOST=fencer.example.net compose/kafka/make-pki.sh
#
# writes compose/pki/ (override with FENCER_PKI_DIR) and compose/secrets/kafka_sasl_<name>
# (FENCER_SECRETS_OUT):
#   ca.pem, ca.key             the deployment's own CA (keep ca.key offline after this)
#   kafka/                     the broker: keystore.pem (key + certificate; SAN kafka,
#                              localhost and $FENCER_KAFKA_EXTERNAL_HOST, a name or an IP
#                              address), ca.pem
#   <principal>/               one per principal of compose/kafka/setup.sh (`scram NAME` lines,
#                              generated from streams/kafka_acl.py) and fencer-admin:
#                              client.pem, client.key (fencer's settings), keystore.pem (Java
#                              clients: the setup job, CloudStack's producer), ca.pem
# The certificate's CN is the principal's name, the same as its SASL user.
# Existing files are kept (run it again after adding a principal); delete a directory to renew.
set -euo pipefail
umask 077
HERE="$(cd "$(dirname "$0")" && pwd)"
PKI="${FENCER_PKI_DIR:-$HERE/../pki}"
SECRETS="${FENCER_SECRETS_OUT:-$HERE/../secrets}"
EXTERNAL="${FENCER_KAFKA_EXTERNAL_HOST:-localhost}"
DAYS="${FENCER_PKI_DAYS:-825}"
mkdir -p "$PKI" "$SECRETS"

if [[ ! -s "$PKI/ca.pem" ]]; then
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$PKI/ca.key" -out "$PKI/ca.pem" -days "$DAYS" -subj "/CN=fencer-kafka-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  echo "made $PKI/ca.pem"
fi

# issue NAME SAN EKU: NAME/client.key, client.pem, keystore.pem, ca.pem
issue() {
  local name="$1" san="$2" eku="$3" dir="$PKI/$1"
  if [[ -s "$dir/client.pem" ]]; then return; fi
  mkdir -p "$dir"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/client.key" -out "$dir/req.csr" -subj "/CN=$name" 2>/dev/null
  local ext; ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    if [[ -n "$san" ]]; then echo "subjectAltName=$san"; fi
  } > "$ext"
  openssl x509 -req -in "$dir/req.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" \
    -CAcreateserial -out "$dir/client.pem" -days "$DAYS" -sha256 -extfile "$ext" 2>/dev/null
  rm -f "$ext" "$dir/req.csr"
  # Kafka's PEM keystore wants an unencrypted PKCS#8 key followed by the certificate.
  openssl pkcs8 -topk8 -nocrypt -in "$dir/client.key" -out "$dir/client.key.p8"
  mv "$dir/client.key.p8" "$dir/client.key"
  cat "$dir/client.key" "$dir/client.pem" > "$dir/keystore.pem"
  cp "$PKI/ca.pem" "$dir/ca.pem"
  chmod 600 "$dir"/*
  echo "made $dir/client.pem (CN=$name)"
}

# The external name CloudStack connects to: a DNS name, or an IP address (an IP SAN).
if [[ $EXTERNAL =~ ^[0-9.]+$ || $EXTERNAL == *:* ]]; then EXT_SAN="IP:$EXTERNAL"; else EXT_SAN="DNS:$EXTERNAL"; fi
issue kafka "DNS:kafka,DNS:localhost,$EXT_SAN" "serverAuth,clientAuth"
issue fencer-admin "" clientAuth

# The principals: the `scram NAME` lines of the generated setup script.
mapfile -t PRINCIPALS < <(sed -n 's/^scram \([a-z0-9-]*\)$/\1/p' "$HERE/setup.sh")
if [[ ${#PRINCIPALS[@]} -eq 0 ]]; then
  echo "make-pki.sh: no 'scram NAME' line in $HERE/setup.sh" >&2
  exit 1
fi
for name in "${PRINCIPALS[@]}"; do
  issue "$name" "" clientAuth
  pw="$SECRETS/kafka_sasl_$name"
  if [[ ! -s "$pw" ]]; then
    # hex: no character that SCRAM's [password=...] syntax or a JAAS string would need escaped
    openssl rand -hex 24 > "$pw"
    chmod 600 "$pw"
    echo "made $pw"
  fi
done
echo "done. Now: sudo chown -R 1000 $PKI/kafka $PKI/fencer-admin  # the kafka image's user"
echo "      sudo chown -R 10001 $PKI/fencer-* $SECRETS/kafka_sasl_fencer-*  # fencer's user"
