#!/bin/sh
# OpenBao side of the Kubernetes example: run once with an admin token (BAO_ADDR,
# BAO_TOKEN) after the database secrets engine has a role "app" (see
# ../compose/setup.sh for that part). Lets the pod's service account app/app log in
# with a token whose audience is "openbao" and read only its own credentials.
set -eu
K8S_HOST="${K8S_HOST:-https://kubernetes.default.svc}"

bao auth list | grep -q '^kubernetes/' || bao auth enable kubernetes
# OpenBao running in the cluster validates tokens with its own service account
bao write auth/kubernetes/config kubernetes_host="$K8S_HOST"

bao policy write app-db - <<'POLICY'
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/renew"   { capabilities = ["update"] }
path "sys/leases/revoke"  { capabilities = ["update"] }
POLICY

bao write auth/kubernetes/role/app \
  bound_service_account_names=app bound_service_account_namespaces=app \
  audience=openbao token_policies=app-db token_ttl=1h token_max_ttl=24h
