#!/bin/sh
# One-shot setup for docker-compose.yml, run in the OpenBao image with the dev root
# token (BAO_TOKEN): the database secrets engine with a role "app", a least-privilege
# policy, and an AppRole whose ids are left for credsidecar on the bootstrap volume.
# The defaults fit the compose project; tests/test_examples.py runs it against the
# test servers by overriding them.
set -eu
export BAO_ADDR="${BAO_ADDR:-http://openbao:8200}"
PG_HOST="${PG_HOST:-postgres}"
PG_PORT="${PG_PORT:-5432}"
PG_DATABASE="${PG_DATABASE:-app}"
DB_MOUNT="${DB_MOUNT:-database}"
AUTH_MOUNT="${AUTH_MOUNT:-approle}"
BOOTSTRAP_DIR="${BOOTSTRAP_DIR:-/bootstrap}"

until bao status >/dev/null 2>&1; do sleep 1; done

bao secrets list | grep -q "^$DB_MOUNT/" || bao secrets enable -path="$DB_MOUNT" database
# "password=-" reads the value from stdin: a password never belongs in argv
printf '%s' "$POSTGRES_PASSWORD" | bao write "$DB_MOUNT/config/pg" \
  plugin_name=postgresql-database-plugin \
  connection_url="postgresql://{{username}}:{{password}}@$PG_HOST:$PG_PORT/$PG_DATABASE?sslmode=disable" \
  username=postgres password=- allowed_roles=app
bao write "$DB_MOUNT/roles/app" db_name=pg default_ttl=1m max_ttl=5m \
  creation_statements="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT pg_read_all_data TO \"{{name}}\";" \
  revocation_statements="SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; DROP ROLE IF EXISTS \"{{name}}\";"

bao policy write "credsidecar-$DB_MOUNT" - <<POLICY
path "$DB_MOUNT/creds/app" { capabilities = ["read"] }
path "sys/leases/renew"    { capabilities = ["update"] }
path "sys/leases/revoke"   { capabilities = ["update"] }
POLICY

bao auth list | grep -q "^$AUTH_MOUNT/" || bao auth enable -path="$AUTH_MOUNT" approle
bao write "auth/$AUTH_MOUNT/role/credsidecar" \
  token_policies="credsidecar-$DB_MOUNT" token_ttl=1h token_max_ttl=24h

umask 077
bao read -field=role_id "auth/$AUTH_MOUNT/role/credsidecar/role-id" >"$BOOTSTRAP_DIR/role-id"
bao write -f -field=secret_id "auth/$AUTH_MOUNT/role/credsidecar/secret-id" >"$BOOTSTRAP_DIR/secret-id"
# credsidecar runs as 65532 and reads them; only root can hand them over
if [ "$(id -u)" = 0 ]; then
  chown 65532:65532 "$BOOTSTRAP_DIR/role-id" "$BOOTSTRAP_DIR/secret-id"
fi
echo "setup done"
