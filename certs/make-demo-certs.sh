#!/bin/sh
# Makes the DEMO-ONLY certificate authority and the certificate for
# click.example.test that config/example.toml uses. Never use these for a
# real host: the private keys are public, in this repository.
#
#   sh certs/make-demo-certs.sh        (run from the repository root)
set -eu
cd "$(dirname "$0")"
days=36500   # long-lived on purpose: a demo that expires helps nobody

openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out demo-ca.key
openssl req -x509 -new -key demo-ca.key -sha256 -days "$days" \
  -subj "/O=linkgate DEMO ONLY/CN=linkgate demo CA (DO NOT TRUST)" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out demo-ca.pem

# An intermediate, so the served chain looks like a real one (leaf + intermediate).
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out demo-intermediate.key
openssl req -new -key demo-intermediate.key \
  -subj "/O=linkgate DEMO ONLY/CN=linkgate demo intermediate (DO NOT TRUST)" -out demo-intermediate.csr
printf '%s\n' "basicConstraints=critical,CA:TRUE,pathlen:0" "keyUsage=critical,keyCertSign,cRLSign" > demo-intermediate.cnf
openssl x509 -req -in demo-intermediate.csr -CA demo-ca.pem -CAkey demo-ca.key -CAcreateserial \
  -days "$days" -sha256 -extfile demo-intermediate.cnf -out demo-intermediate.pem

mkdir -p click.example.test
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out click.example.test/privkey.pem
openssl req -new -key click.example.test/privkey.pem \
  -subj "/O=linkgate DEMO ONLY/CN=click.example.test" -out click.example.test/req.csr
printf '%s\n' \
  "subjectAltName=DNS:click.example.test" \
  "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" \
  "extendedKeyUsage=serverAuth" \
  "crlDistributionPoints=URI:http://crl.example.test/linkgate-demo.crl" > click.example.test/ext.cnf
openssl x509 -req -in click.example.test/req.csr -CA demo-intermediate.pem -CAkey demo-intermediate.key \
  -CAcreateserial -days "$days" -sha256 -extfile click.example.test/ext.cnf -out click.example.test/cert.pem
cat click.example.test/cert.pem demo-intermediate.pem > click.example.test/fullchain.pem
# The CA keys are not needed once the demo certificate exists; keep them out of the repository.
rm -f click.example.test/req.csr click.example.test/ext.cnf click.example.test/cert.pem \
  demo-intermediate.csr demo-intermediate.cnf demo-intermediate.pem demo-ca.srl demo-intermediate.srl \
  demo-ca.key demo-intermediate.key
echo "demo certificates written to $(pwd)"
