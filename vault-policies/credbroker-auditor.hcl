# credbroker-auditor: the weekly reviewer. Sees who rotated what and when,
# and can match values against Vault's audit log - never a secret value.
#
# May NOT: read secret values (secret/data/...), write anything, decrypt or
# sign, or change policies, auth methods or audit devices.

# KV metadata of every bot's secret: versions, created/deleted times, and the
# custom metadata the rotation script records (rotated_by, rotated_at, ...).
path "secret/metadata/credbroker/*" {
  capabilities = ["read", "list"]
}

# audit-hash: HMAC a known value (a token accessor, a request id) with an
# audit device's key, to find it in the audit log, where values are hashed.
path "sys/audit-hash/*" {
  capabilities = ["update"]
}

# Which audit devices exist (listing them needs sudo on this one path).
path "sys/audit" {
  capabilities = ["read", "sudo"]
}

# Transit key descriptions (type, versions, rotation times, public keys);
# the keys are non-exportable, so this reveals no private material.
path "transit/keys/credbroker-*" {
  capabilities = ["read"]
}

path "transit/keys" {
  capabilities = ["list"]
}

# The audit logs' Vault anchors (the head of each host's chain): read them all,
# with their versions, to check a host's log against them. Never written here.
path "secret/data/credbroker-audit/*" {
  capabilities = ["read"]
}

path "secret/metadata/credbroker-audit/*" {
  capabilities = ["read", "list"]
}
