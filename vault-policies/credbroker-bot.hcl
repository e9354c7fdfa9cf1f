# credbroker-bot: what ONE bot may do, and nothing else.
#
# Per-bot scoping: this file is a template. `scripts/setup-vault BOT` replaces
# every __BOT__ with the bot's name and writes the result as the policy
# `credbroker-bot-BOT`, attached only to the AppRole `credbroker-BOT`
# (a generated policy per bot; no identity templating, so it works the same
# on Vault and OpenBao and with token auth). Bot names are limited to
# [A-Za-z0-9_-] so a name can never widen a path (no "/", "*", "+").
#
# Paths are exact: no glob, so bot "alpha" cannot read "alpha2" or "alpha/x".
# There is no "list" and no write anywhere: a bot cannot discover other bots
# or change a secret. The one thing it may create is the sign-only child
# token of the last rule (for a bot enrolled with --transit-key).
# The token also carries Vault's built-in `default` policy (token
# lookup-self / renew-self / revoke-self), which the broker needs for runs of
# days (issue 5, part 5).

# Read its own secret (KV v2 data endpoint; all versions, for a pinned version).
path "secret/data/credbroker/__BOT__" {
  capabilities = ["read"]
}

# Read its own secret's metadata: `credbroker run` watches current_version to
# follow a rotation (issue 5, part 3). Metadata holds versions, timestamps and
# the custom metadata the rotation script writes (who/when), never values.
path "secret/metadata/credbroker/__BOT__" {
  capabilities = ["read"]
}

# Transit, for bots whose key lives in Vault (key name credbroker-BOT):
# decrypt fields stored as vault:v1:... ciphertext, sign requests, and read
# the key's description (type, version, public key) - the key is created
# non-exportable, so reading it never reveals private material.
path "transit/decrypt/credbroker-__BOT__" {
  capabilities = ["update"]
}

path "transit/sign/credbroker-__BOT__" {
  capabilities = ["update"]
}

path "transit/keys/credbroker-__BOT__" {
  capabilities = ["read"]
}

# Signing inside Vault (broker.signing.transit): `credbroker run` gives the bot
# process its own short-lived token that may only sign, never the broker's
# token. Creating it needs auth/token/create, constrained here to exactly the
# signer policy credbroker-sign-transit-credbroker-BOT (written, and attached
# to the AppRole, by `setup-vault --transit-key`); Vault also refuses a child
# any policy its parent lacks. Orphan tokens, periodic tokens and token roles
# stay denied, so a child never outlives the broker's token.
path "auth/token/create" {
  capabilities = ["update"]
  # Without "policies" a child would inherit every policy of its parent.
  required_parameters = ["policies"]
  allowed_parameters = {
    # Both forms Vault accepts: a JSON list (as hvac sends it) and a string.
    "policies" = [["credbroker-sign-transit-credbroker-__BOT__"], "credbroker-sign-transit-credbroker-__BOT__"]
    "*"        = []
  }
  denied_parameters = {
    "no_parent"    = [true, "true"]
    "period"       = []
    "id"           = []
    "type"         = []
    "entity_alias" = []
  }
}
