#!/usr/bin/env bash
# Credentials for a secure federation: a local certificate authority, the SuperLink's TLS
# certificate (valid for 127.0.0.1, localhost and every HOST given), and one ECDSA key pair per
# SuperNode for SuperNode authentication (OpenSSH format, as flower-supernode expects).
#
#   scripts/make-credentials.sh DIR N [HOST ...]
#
# DIR/ca.crt               give to every data owner (--root-certificates) and to `flwr` (root-certificates)
# DIR/server.pem, .key     the SuperLink's certificate and key (--ssl-certfile, --ssl-keyfile)
# DIR/node-K, node-K.pub   data owner K's private key (--auth-supernode-private-key, stays with K)
#                          and public key (registered with `flwr supernode register`)
set -euo pipefail
DIR=${1:?usage: scripts/make-credentials.sh DIR N [HOST ...]}
N=${2:?usage: scripts/make-credentials.sh DIR N [HOST ...]}
shift 2
mkdir -p "$DIR"
cd "$DIR"

san="IP:127.0.0.1,DNS:localhost"
for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done

openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 -sha256 \
    -subj "/CN=fgrpo federation CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -sha256 \
    -subj "/CN=fgrpo superlink" 2>/dev/null
printf "subjectAltName = %s\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\n" \
    "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 \
    -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext

for k in $(seq 0 $((N - 1))); do
    rm -f "node-$k" "node-$k.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fgrpo-node-$k" -f "node-$k"
done
chmod 600 ca.key server.key node-*[0-9]
echo "wrote CA, SuperLink certificate ($san) and $N SuperNode key pairs to $DIR"
