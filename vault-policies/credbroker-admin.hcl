# credbroker-admin: the person (or pipeline) who stores and rotates bots' keys.
#
# May write, rotate, read back and manage metadata of every secret under
# secret/credbroker/, and manage the transit keys named credbroker-*.
# May NOT: touch anything outside those prefixes, write policies, create or
# change auth methods or AppRoles, read the audit configuration, decrypt or
# sign with transit keys, or export them. Setting up Vault (scripts/setup-vault)
# needs a more powerful operator token; day-to-day rotation needs only this.

# Secret values: write new versions (put/patch) and read them back to verify.
path "secret/data/credbroker/*" {
  capabilities = ["create", "read", "update", "patch"]
}

# Metadata: current_version, custom metadata (rotated_by/rotated_at), max
# versions, and listing the bots.
path "secret/metadata/credbroker/*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list"]
}

# Soft-delete, undelete and destroy versions (e.g. destroy a leaked version).
path "secret/delete/credbroker/*" {
  capabilities = ["update"]
}

path "secret/undelete/credbroker/*" {
  capabilities = ["update"]
}

path "secret/destroy/credbroker/*" {
  capabilities = ["update"]
}

# Transit keys: create, read, configure (.../config), rotate (.../rotate) and
# list the credbroker-* keys; the glob covers the sub-paths. No "delete"
# (keys stay undeletable), and export/backup live elsewhere (transit/export,
# transit/backup), so they stay denied.
path "transit/keys/credbroker-*" {
  capabilities = ["create", "read", "update"]
}

path "transit/keys" {
  capabilities = ["list"]
}

# Encrypt a new value with a bot's transit key before storing it in KV
# (the bot decrypts it; the admin never needs to).
path "transit/encrypt/credbroker-*" {
  capabilities = ["update"]
}
